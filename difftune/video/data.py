"""A training folder of clips: what is in it, checked before any model loads, and the pixels of a clip.

The folder holds clips (videos, animated WebP/GIF, folders of frames) and still images, which train as
clips of one frame. Captions come as for images (`difftune.training.data`): a sidecar ``<clip>.txt``
(``<folder>.txt`` beside a frame folder) or ``metadata.jsonl`` (``file_name``: the clip's file or
folder name).

Which frames a clip gives (`FrameSampling`): every ``frame_stride``-th frame of the source, or frames
resampled to ``fps``; ``num_frames`` of them, from a window that starts at random (drawn once per clip
when latents are cached, else every step) or in the middle with ``center_crop``. A clip too short for
``num_frames`` takes the largest of ``frame_buckets`` it reaches; clips of different lengths then
train in batches of their own length (`SubjectData.batches`). Every frame count is one the VAE can
take (``1 + k·frame_multiple``, 4 for Wan). A clip that is too short or unreadable is named, in one
line, by `scan_clip_folder`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DifftuneError
from ..paths import SUBJECT_FILE
from ..training.data import CAPTION_SUFFIX, METADATA_FILE, CropPlan, read_metadata_captions
from .clips import ClipInfo, clip_info, read_clip, source_kind

VIDEO_DEFAULT_FRAMES = 81  # Wan's 5 s at 16 fps


@dataclasses.dataclass(frozen=True)
class ClipRecord:
    """One training clip: where it is, what it holds, how many frames it trains with, its caption."""

    path: Path
    width: int
    height: int
    source_frames: int
    fps: float | None
    frames: int  # frames it trains with: --num_frames, or a smaller bucket
    step: float  # source frames between two of its frames
    caption: str | None = None


def parse_resolution(text: str) -> int | tuple[int, int]:
    """``--resolution``: a side (``512``) or height x width (``480x832``); whether they are positive is the
    flag's check (`training.positive_resolution`)."""
    match = re.fullmatch(r"\s*(-?\d+)\s*(?:[xX×,]\s*(-?\d+)\s*)?", str(text))
    if not match:
        raise DifftuneError(f"--resolution {text!r}: give a size in pixels (512) or height x width (480x832)")
    height, width = int(match[1]), int(match[2] or match[1])
    return height if match[2] is None else (height, width)


def as_height_width(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def check_video_resolution(resolution: int | tuple[int, int], multiple: int, model: str) -> tuple[int, int]:
    """Height and width, each a multiple of what the VAE and the patching need (16 for Wan)."""
    height, width = as_height_width(resolution)
    if height % multiple or width % multiple:
        raise DifftuneError(f"--resolution {height}x{width}: height and width must be multiples of "
                            f"{multiple} for {model} (the VAE's compression times the transformer's patch)")
    return height, width


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """Which frames a clip trains with (see the module docstring)."""

    num_frames: int
    frame_multiple: int = 4
    frame_stride: int | None = None
    fps: float | None = None
    frame_buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.frame_stride is not None and self.fps is not None:
            raise DifftuneError("give --frame_stride or --fps, not both")
        if self.frame_stride is not None and self.frame_stride < 1:
            raise DifftuneError(f"--frame_stride must be at least 1, got {self.frame_stride}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise DifftuneError(f"--fps must be positive, got {self.fps}")
        for flag, counts in (("--num_frames", (self.num_frames,)), ("--frame_buckets", self.frame_buckets)):
            for count in counts:
                if count < 1 or (count - 1) % self.frame_multiple:
                    valid = ", ".join(str(1 + self.frame_multiple * k) for k in range(5))
                    raise DifftuneError(
                        f"{flag} {count}: clips of this model have 1 + {self.frame_multiple}·k frames "
                        f"({valid}, ...): the VAE keeps the first frame and packs every "
                        f"{self.frame_multiple} more into one latent frame")
        too_long = [count for count in self.frame_buckets if count > self.num_frames]
        if too_long:
            raise DifftuneError(f"--frame_buckets {too_long[0]}: buckets are the shorter lengths a clip too "
                                f"short for --num_frames {self.num_frames} takes; none may exceed it")

    def step(self, info: ClipInfo, path: Path, flag: str) -> float:
        """Source frames between two training frames."""
        if self.fps is None:
            return float(self.frame_stride or 1)
        if info.frames == 1:
            return 1.0
        if info.fps is None:
            raise DifftuneError(f"{flag}: {path} has no frame rate (a folder of frames); give --frame_stride "
                                "instead of --fps")
        return info.fps / self.fps

    def length(self, available: int) -> int | None:
        """The frames a clip with ``available`` frames (after the step) trains with; None: too short."""
        if available >= self.num_frames:
            return self.num_frames
        fitting = [count for count in self.frame_buckets if count <= available]
        return max(fitting) if fitting else None

    def describe(self) -> str:
        spacing = (f"at {self.fps:g} fps" if self.fps else
                   f"every {self.frame_stride}. frame" if self.frame_stride and self.frame_stride > 1 else
                   "consecutive")
        buckets = f", shorter clips {'/'.join(map(str, self.frame_buckets))}" if self.frame_buckets else ""
        return f"{self.num_frames} frames {spacing}{buckets}"


def _available(frames: int, step: float) -> int:
    """Frames a source of ``frames`` gives at ``step`` apart (the first one included)."""
    return math.floor((frames - 1) / step + 1e-9) + 1


def scan_clip_folder(folder: str | Path, sampling: FrameSampling, flag: str = "--instance_data_dir",
                     caption_column: str | None = None) -> list[ClipRecord]:
    """Check a folder of clips and list them (sorted by name) with their captions and frame counts.

    A missing or empty folder, an unreadable clip, and a clip too short for ``--num_frames`` (and every
    bucket) are errors, each naming the file in one line; files that are not clips are skipped with one
    warning naming them.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DifftuneError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise DifftuneError(f"{flag} {folder}: not a folder")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    sources = [p for p in entries if source_kind(p) is not None]
    stems = {p.stem if p.is_file() else p.name for p in sources}
    skipped = [p.name for p in entries if p not in sources and p.name not in (METADATA_FILE, SUBJECT_FILE)
               and not (p.suffix.lower() == CAPTION_SUFFIX and p.stem in stems)]
    if skipped:
        warnings.warn(f"{flag} {folder}: skipping {len(skipped)} file(s) that are not clips: "
                      f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}", stacklevel=2)
    if not sources:
        raise DifftuneError(f"{flag} {folder}: no clips found (videos, animated WebP/GIF, folders of frames "
                            "or still images)")
    captions = read_metadata_captions(folder, caption_column, flag)
    records = []
    for path in sources:
        try:
            info = clip_info(path)
        except DifftuneError as err:
            raise DifftuneError(f"{flag}: {err}") from None
        step = sampling.step(info, path, flag)
        available = _available(info.frames, step)
        frames = 1 if info.frames == 1 else sampling.length(available)  # a still image: one frame
        if frames is None:
            spacing = f" at {sampling.fps:g} fps" if sampling.fps else (
                f" at --frame_stride {sampling.frame_stride}" if (sampling.frame_stride or 1) > 1 else "")
            buckets = (f" or the smallest of --frame_buckets ({min(sampling.frame_buckets)})"
                       if sampling.frame_buckets else "")
            raise DifftuneError(
                f"{flag}: clip {path} is too short: {info.frames} frames give {available}{spacing}, "
                f"--num_frames {sampling.num_frames}{buckets} needs more (lower --num_frames, add shorter "
                "--frame_buckets, or lower --frame_stride / --fps)")
        sidecar = (path.with_name(path.name + CAPTION_SUFFIX) if path.is_dir()
                   else path.with_suffix(CAPTION_SUFFIX))
        caption = sidecar.read_text().strip() if sidecar.is_file() else captions.get(path.name)
        records.append(ClipRecord(path, info.width, info.height, info.frames, info.fps, frames, step,
                                  caption or None))
    return records


def warn_small_clips(records: Sequence[ClipRecord], resolution: tuple[int, int], flag: str) -> None:
    height, width = resolution
    small = [f"{r.path.name} ({r.width}x{r.height})" for r in records if r.width < width or r.height < height]
    if small:
        warnings.warn(f"{flag}: {len(small)} clip(s) smaller than --resolution {height}x{width} will be "
                      f"upscaled (blurry training targets): {', '.join(small[:10])}", stacklevel=2)


def frame_indices(record: ClipRecord, start: int) -> list[int]:
    """The source frames of a clip's window that begins at its ``start``-th training frame."""
    return [min(record.source_frames - 1, round((start + k) * record.step)) for k in range(record.frames)]


@dataclasses.dataclass(frozen=True)
class ClipLoader:
    """`SubjectData`'s ``load_pixels`` for clips: the window's frames, resized and cropped alike,
    as (3, frames, height, width) in [-1, 1]."""

    resolution: tuple[int, int]
    center_crop: bool = False

    def __call__(self, record: ClipRecord, generator: torch.Generator):
        starts = _available(record.source_frames, record.step) - record.frames + 1
        if self.center_crop:
            start = (starts - 1) // 2
        else:
            start = int(torch.randint(0, max(starts, 1), (), generator=generator))
        frames, _ = read_clip(record.path, frame_indices(record, start))
        plan = CropPlan.draw(frames[0].size, self.resolution, self.center_crop, generator)
        pixels = torch.stack([plan.apply(frame) for frame in frames], dim=1)
        return pixels, (record.height, record.width), (plan.top, plan.left)
