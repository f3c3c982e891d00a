"""Class images for prior preservation: generate the missing ones with the base model.

Images are written atomically, one file each (``class-00000.png``, ...), and kept: a
later run with the same folder generates nothing, and a run killed mid-way keeps what
it finished. Image ``class-k`` comes from its own generator seeded with (seed, k), so
the set does not depend (beyond float rounding) on the batch size or the number of
processes. A video model's class examples are clips (``num_frames``), written as lossless
animated WebP (``class-00000.webp``), which the clip reader takes back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..io import atomic_write, save_webp
from .data import IMAGE_SUFFIXES, RandomDomain, sample_generator

CLASS_IMAGE_PATTERN = "class-{:05d}.png"
CLASS_CLIP_PATTERN = "class-{:05d}.webp"


def existing_images(class_dir: str | Path) -> list[Path]:
    class_dir = Path(class_dir)
    if not class_dir.is_dir():
        return []
    return sorted(p for p in class_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def missing_image_numbers(class_dir: str | Path, wanted: int,
                          pattern: str = CLASS_IMAGE_PATTERN) -> list[int]:
    """Numbers k of the ``class-k.png`` files (``pattern``) to generate to reach ``wanted`` images."""
    class_dir = Path(class_dir)
    missing = wanted - len(existing_images(class_dir))
    numbers: list[int] = []
    k = 0
    while len(numbers) < missing:
        if not (class_dir / pattern.format(k)).exists():
            numbers.append(k)
        k += 1
    return numbers


def ensure_class_images(
    pipeline: Any,
    class_dir: str | Path,
    class_prompt: str,
    num_class_images: int,
    *,
    seed: int,
    resolution: int | tuple[int, int],
    batch_size: int = 4,
    num_inference_steps: int = 50,
    accelerator: Any = None,
    autocast: contextlib.AbstractContextManager | None = None,
    num_frames: int | None = None,
) -> int:
    """Generate the class images ``class_dir`` lacks, at ``resolution`` (a side, or height and width);
    returns how many this process made. With ``num_frames``, clips of a video pipeline.

    With several processes each generates its share; all wait for the others.
    """
    class_dir = Path(class_dir)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = accelerator.is_main_process if accelerator else True
    pattern = CLASS_IMAGE_PATTERN if num_frames is None else CLASS_CLIP_PATTERN
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    numbers = missing_image_numbers(class_dir, num_class_images, pattern)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process computed the same list before any write
    if not numbers:
        return 0
    mine = numbers[rank::world]
    if mine:
        class_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(mine), desc=f"generating class images ({len(numbers)} missing)", disable=not is_main)
    with torch.random.fork_rng(), torch.no_grad(), autocast or contextlib.nullcontext():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            generators = [sample_generator(seed, RandomDomain.CLASS_IMAGE, k) for k in chunk]
            # a video pipeline returns numpy frames unless asked for PIL (image pipelines: PIL already)
            clips = {} if num_frames is None else {"num_frames": num_frames, "output_type": "pil"}
            output = pipeline(prompt=[class_prompt] * len(chunk), generator=generators, height=height,
                              width=width, num_inference_steps=num_inference_steps, **clips)
            samples = output.images if num_frames is None else output.frames
            for k, sample in zip(chunk, samples, strict=True):
                _save_class_example(class_dir / pattern.format(k), sample)
            bar.update(len(chunk))
    bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return len(mine)


def _save_class_example(path: Path, sample: Any) -> None:
    """An image as PNG, a clip (a list of frames) as lossless animated WebP; atomically."""
    if isinstance(sample, list):
        save_webp(sample, path)
    else:
        atomic_write(path, lambda tmp: sample.save(tmp, format="PNG"))
