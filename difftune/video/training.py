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
from typing import Any, ClassVar

from PIL import Image

from ..errors import DifftuneError
from ..options import Check, CheckedSettings, at_least, option, positive
from ..sampling import GenerationSettings
from .clips import DEFAULT_FPS, frame_strip, save_clip_grid
from .data import (
    VIDEO_DEFAULT_FRAMES,
    ClipLoader,
    ClipRecord,
    FrameSampling,
    as_height_width,
    check_video_resolution,
    scan_clip_folder,
)


@dataclasses.dataclass(frozen=True)
class VideoSettings(CheckedSettings):
    """The frames a video model (Wan) trains with: a data folder of clips (mp4/webm/mkv/mov through PyAV,
    animated WebP/GIF, folders of frames; still images train as one-frame clips), docs/video.md. The
    counts the model's VAE takes (1 + 4k for Wan) are checked against the model (`FrameSampling`)."""

    flag_group: ClassVar[str] = "video"

    num_frames: int | None = option(
        None, f"frames per training clip, 1 + 4k for Wan (default: {VIDEO_DEFAULT_FRAMES}, Wan's 5 s at "
              "16 fps); validation and class clips have as many", check=at_least(1))
    frame_stride: int | None = option(None, "take every n-th frame of a clip (default: 1, consecutive "
                                            "frames)", check=at_least(1))
    fps: float | None = option(None, "or: resample every clip to this frame rate first (clips without one, "
                                     "folders of frames, need --frame_stride); also the rate samples are "
                                     "written at (default 16)", check=positive())
    frame_buckets: list[int] | None = option(
        None, "shorter frame counts (each 1 + 4k) a clip too short for --num_frames trains with (the "
              "largest it reaches) instead of being refused; batches hold one length",
        check=Check(lambda counts: all(count >= 1 for count in counts), "must all be at least 1"))


# the flags only video models take (refused on image models by `check_video_flags`)
VIDEO_FLAGS = tuple(field.name for field in dataclasses.fields(VideoSettings))


def positive_resolution() -> Check:
    """``--resolution``'s check: a positive side, or a positive height and width."""
    return Check(lambda value: min(as_height_width(value)) > 0, "must be positive")


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
