"""Sample images during and after training: grids on disk and in the experiment tracker."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..io import save_image
from .data import RandomDomain, sample_generator


def generate_images(
    pipeline: Any,
    prompt_kwargs: dict[str, Any],
    *,
    num_images: int,
    seed: int,
    num_inference_steps: int,
    resolution: int,
    guidance_scale: float | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> list[Image.Image]:
    """``num_images`` samples, image i from its own seeded generator (reproducible, batch-free).

    ``prompt_kwargs`` is ``{"prompt": text}`` or precomputed embeddings. The global
    random state is left untouched, so sampling in the middle of training does not
    change what training draws next.
    """
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    images = []
    with torch.random.fork_rng(), torch.no_grad(), autocast or contextlib.nullcontext():
        for index in range(num_images):
            generator = sample_generator(seed, RandomDomain.VALIDATION, index)
            output = pipeline(**prompt_kwargs, num_inference_steps=num_inference_steps, height=resolution,
                              width=resolution, generator=generator, **extra)
            images.append(output.images[0])
    return images


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images side by side in rows of ``columns`` (a near-square layout by default)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


def save_grid(images: Sequence[Image.Image], path: str | Path, columns: int | None = None) -> Path:
    """Write the grid (rows of ``columns``, near-square by default) as PNG atomically; returns the path."""
    grid = image_grid(images, columns)
    return save_image(path, grid)


def log_images(accelerator: Any, tag: str, images: Sequence[Image.Image], step: int) -> None:
    """Send images to every active tracker that takes images (TensorBoard, W&B)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=step)
