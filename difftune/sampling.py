"""Draw images with a pipeline reproducibly, and lay them out as grids: what a trainer samples during and
after training, an evaluation scores and an export compares."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .io import save_image


@dataclasses.dataclass
class GenerationSettings:
    """How images are drawn; part of every evaluation result so runs can be compared (and resumed)."""

    images_per_prompt: int = 4
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float | None = 7.5  # None: the pipeline's own
    height: int | None = None  # None: the pipeline's own
    width: int | None = None
    batch_size: int = 8
    num_frames: int | None = None  # a video pipeline's clip length (None: an image pipeline, or its own)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def image_seed(settings: GenerationSettings, prompt_index: int, image_index: int) -> int:
    """Seed of image k of prompt p: the same in every run, whatever the batch size."""
    return settings.seed * 1_000_003 + prompt_index * settings.images_per_prompt + image_index


def generate_images(pipe: Any, prompts: Sequence[str | Mapping[str, Any]], settings: GenerationSettings, *,
                    desc: str = "generate", show_progress: bool = True,
                    autocast: contextlib.AbstractContextManager | None = None) -> list[list[Image.Image]]:
    """``images_per_prompt`` PIL images for each prompt, in prompt order: what the evaluation
    scores and what a trainer samples during and after training. A video pipeline's samples are clips
    (lists of PIL frames), ``num_frames`` long when the settings give it.

    Image k of prompt p comes from its own generator seeded with `image_seed` (on the pipeline's
    device; on the CPU for MPS), so it does not depend on the batch it is drawn in. A prompt is
    a text or the keyword arguments of precomputed embeddings (drawn one image per call). The
    global random state is left untouched, so sampling in the middle of training does not
    change what training draws next.
    """
    return generate_image_sets(pipe, [prompts], settings, desc=desc, show_progress=show_progress,
                               autocast=autocast)[0]


def generate_image_sets(pipe: Any, prompt_sets: Sequence[Sequence[str | Mapping[str, Any]]],
                        settings: GenerationSettings, *, desc: str = "generate", show_progress: bool = True,
                        autocast: contextlib.AbstractContextManager | None = None
                        ) -> list[list[list[Image.Image]]]:
    """`generate_images` for several prompt lists at once, in shared pipeline calls: one result per list.

    Image k of prompt p has the seed `image_seed` (p, k) in every list, so a list drawn here is the
    list drawn alone (to float rounding: a batch of other prompts around it), and two lists of the same
    length are drawn from the same noise (the evaluation's prompts and their class prompts). Batches
    fill across the lists, so no call runs part-empty at the end of one.
    """
    from tqdm.auto import tqdm

    jobs = [(s, p, k) for s, prompts in enumerate(prompt_sets) for p in range(len(prompts))
            for k in range(settings.images_per_prompt)]
    texts = all(isinstance(p, str) for prompts in prompt_sets for p in prompts)
    batch_size = settings.batch_size if texts else 1
    images: list[list[list[Image.Image]]] = [[[] for _ in prompts] for prompts in prompt_sets]
    device = getattr(pipe, "device", torch.device("cpu"))
    generator_device = "cpu" if device.type == "mps" else device
    extra = {} if settings.guidance_scale is None else {"guidance_scale": settings.guidance_scale}
    if settings.num_frames is not None:
        extra["num_frames"] = settings.num_frames
    pipe.set_progress_bar_config(disable=True)
    with (torch.random.fork_rng(), torch.no_grad(), autocast or contextlib.nullcontext(),
          tqdm(total=len(jobs), desc=desc, unit="img", disable=not show_progress) as bar):
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            generators = [torch.Generator(generator_device).manual_seed(image_seed(settings, p, k))
                          for _, p, k in batch]
            first_set, first_prompt, _ = batch[0]
            prompt = prompt_sets[first_set][first_prompt]
            prompt_kwargs = ({"prompt": [prompt_sets[s][p] for s, p, _ in batch]} if isinstance(prompt, str)
                             else prompt)
            output = pipe(**prompt_kwargs, num_inference_steps=settings.num_inference_steps,
                          height=settings.height, width=settings.width, generator=generators,
                          output_type="pil", **extra)
            samples = output.frames if hasattr(output, "frames") else output.images  # clips or images
            for (s, p, _), image in zip(batch, samples, strict=True):
                images[s][p].append(image)
            bar.update(len(batch))
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
