"""What a trainer does differently for a video model (`ModelFamily.video`): its data flags and checks,
the clips it reads, and the clips it writes where image models write grids.

The subject trainer calls these where it branches on ``family.video``; everything else (the family's
noise and loss, adapters, checkpoints, files) is the same as for images.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DifftuneError
from ..sampling import GenerationSettings
from .clips import DEFAULT_FPS, frame_strip, save_clip_grid
from .data import (
    VIDEO_DEFAULT_FRAMES,
    ClipLoader,
    ClipRecord,
    FrameSampling,
    check_video_resolution,
    parse_resolution,
    scan_clip_folder,
)

VIDEO_FLAGS = ("num_frames", "frame_stride", "fps", "frame_buckets")


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "video", "models that make clips (Wan): a data folder of clips (mp4/webm/mkv/mov through PyAV, "
        "animated WebP/GIF, folders of frames; still images train as one-frame clips), docs/video.md")
    group.add_argument("--num_frames", type=int,
                       help=f"frames per training clip, 1 + 4k for Wan (default: {VIDEO_DEFAULT_FRAMES}, "
                            "Wan's 5 s at 16 fps); validation and class clips have as many")
    group.add_argument("--frame_stride", type=int,
                       help="take every n-th frame of a clip (default: 1, consecutive frames)")
    group.add_argument("--fps", type=float,
                       help="or: resample every clip to this frame rate first (clips without one, folders of "
                            "frames, need --frame_stride); also the rate samples are written at (default 16)")
    group.add_argument("--frame_buckets", type=int, nargs="+",
                       help="shorter frame counts (each 1 + 4k) a clip too short for --num_frames trains "
                            "with (the largest it reaches) instead of being refused; batches hold one length")


def check_video_flags(args: argparse.Namespace, family: Any) -> None:
    """Refuse video flags on an image model, and a height x width resolution other than square (image
    trainers crop squares)."""
    if family.video:
        return
    given = [f"--{name}" for name in VIDEO_FLAGS if getattr(args, name, None) is not None]
    if given:
        raise DifftuneError(f"{', '.join(given)} only apply to video models (Wan); the base model is "
                            f"{family.name}")
    resolution = getattr(args, "resolution", None)
    if isinstance(resolution, tuple):
        if resolution[0] != resolution[1]:
            raise DifftuneError(f"--resolution {resolution[0]}x{resolution[1]}: image models train square "
                                "crops; give one size")
        args.resolution = resolution[0]


def resolution_argument(text: str) -> int | tuple[int, int]:
    """argparse type of ``--resolution``: a side or height x width."""
    try:
        return parse_resolution(text)
    except DifftuneError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@dataclasses.dataclass(frozen=True)
class VideoData:
    """A video run's data settings, checked before the model loads."""

    resolution: tuple[int, int]  # height, width
    sampling: FrameSampling
    fps: float  # what written clips play at

    def loader(self, center_crop: bool) -> ClipLoader:
        return ClipLoader(self.resolution, center_crop)

    def scan(self, folder: str | Path, flag: str, caption_column: str | None = None) -> list[ClipRecord]:
        return scan_clip_folder(folder, self.sampling, flag, caption_column)

    def generation(self, settings: GenerationSettings) -> GenerationSettings:
        """Sampling settings of the run's clips: its height, width and frame count."""
        height, width = self.resolution
        return dataclasses.replace(settings, height=height, width=width, num_frames=self.sampling.num_frames)

    def describe(self) -> str:
        height, width = self.resolution
        return f"{height}x{width}, {self.sampling.describe()}"


def video_data(args: argparse.Namespace, model_info: Any, resolution: int | tuple[int, int]) -> VideoData:
    """The run's clip geometry from its flags: ``resolution`` as the trainer checked it, frame counts
    that fit the model's VAE (`FrameSampling`)."""
    sampling = FrameSampling(
        num_frames=args.num_frames or VIDEO_DEFAULT_FRAMES, frame_multiple=model_info.frame_multiple,
        frame_stride=args.frame_stride, fps=args.fps,
        frame_buckets=tuple(sorted(set(args.frame_buckets or ()))))
    size = check_video_resolution(resolution, model_info.size_multiple, args.pretrained_model_name_or_path)
    return VideoData(size, sampling, args.fps or DEFAULT_FPS)


def save_samples(samples: Sequence[Any], stem: str | Path,
                 fps: float = DEFAULT_FPS) -> tuple[list[str], Image.Image]:
    """Write a video model's samples (clips) as ``<stem>.webp`` (animated, side by side), ``.mp4`` (with
    PyAV) and ``.png`` (the frame strip); returns the names written and the strip (for the tracker)."""
    saved = save_clip_grid(samples, stem, fps)
    names = [saved.webp.name, saved.strip.name] + ([saved.mp4.name] if saved.mp4 else [])
    return names, frame_strip(samples)
