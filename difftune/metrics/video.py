"""Video in the subject evaluation: clips are scored frame by frame, plus how steady they are.

CLIP-T, CLIP-I (and DINO) of a video model are the image metrics over every frame of every clip,
averaged (`frames_of`): a clip counts as its frames. Temporal consistency is the mean CLIP cosine of
consecutive frames, averaged over the frame pairs of every clip (1: a still picture; random frames:
near the mean cosine of unrelated images), as VBench's and the video-LoRA papers' frame-to-frame
CLIP similarity. A subject given as clips is represented by all their frames (`subject_frames`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import DifftuneError


def is_clip(sample: Any) -> bool:
    """A sample of a video pipeline: a list of frames."""
    return isinstance(sample, (list, tuple))


def frames_of(generated: Sequence[Sequence[Any]]) -> list[list[Image.Image]]:
    """Per prompt, every frame of its clips in order (images pass unchanged)."""
    return [[frame for sample in group for frame in (sample if is_clip(sample) else [sample])]
            for group in generated]


def temporal_consistency(clip_model: Any, clips: Sequence[Sequence[Image.Image]]) -> float | None:
    """Mean CLIP cosine of consecutive frames over all clips (None: no clip has two frames)."""
    cosines = []
    for frames in clips:
        if len(frames) < 2:
            continue
        embeddings = clip_model.image_embeddings(list(frames)).double()
        embeddings = embeddings / embeddings.norm(dim=1, keepdim=True)
        cosines.append((embeddings[1:] * embeddings[:-1]).sum(dim=1))
    return float(torch.cat(cosines).mean()) if cosines else None


def subject_frames(directory: str | Path) -> list[Image.Image]:
    """Every frame of every clip (and still image) of a subject folder, sorted by name."""
    from ..video.clips import read_clip, source_kind

    directory = Path(directory)
    if not directory.is_dir():
        raise DifftuneError(f"subject folder {directory} does not exist")
    sources = sorted(p for p in directory.iterdir() if not p.name.startswith(".") and source_kind(p))
    frames = [frame for source in sources for frame in read_clip(source)[0]]
    if not frames:
        raise DifftuneError(f"subject folder {directory} holds no clips or images")
    return frames


VIDEO_COLUMNS = ["frames_per_clip", "temporal_consistency"]
VIDEO_HEADERS = {"frames_per_clip": "frames", "temporal_consistency": "temporal"}


def video_columns(results: list[dict[str, Any]]) -> list[str]:
    """The video columns where a run scored clips, else none."""
    return VIDEO_COLUMNS if any(r.get("temporal_consistency") is not None for r in results) else []
