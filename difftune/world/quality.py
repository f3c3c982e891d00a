"""How good is the embedded model? Prompt following and FID, both judged by the world CLIP.

Prompt following: images generated from held-out one-object captions are classified
zero-shot by the world CLIP over all (colour, shape) prompts; a sample is correct when
the predicted colour (shape) is the caption's. FID uses world-CLIP image embeddings
(torchmetrics ``FrechetInceptionDistance`` with a custom feature module): generated
images from the captions of ``heldout_a`` against real ``heldout_b`` scenes, next to real
``heldout_a`` against real ``heldout_b`` (the floor set by sampling noise alone).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .clip_model import accuracy_against, classify_color_shape, load_world_clip, single_object_scenes
from .scenes import render_scene, world_scene

ACCURACY_KEYS = ("color", "shape", "color_and_shape", "count")


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    batch_size: int = 50


def load_embedded_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The pipeline from a folder, offline, with its progress bar off."""
    from diffusers import StableDiffusionPipeline

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline in {model_dir} (expected model_index.json there)")
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], settings: SamplingSettings | None = None,
             progress: bool = False) -> torch.Tensor:
    """Images (N, 3, 64, 64) in [-1, 1]; prompt i always gets seed ``settings.seed + i``."""
    settings = settings or SamplingSettings()
    images = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc="generate", unit="batch",
                      disable=not progress):
        batch = prompts[start:start + settings.batch_size]
        generators = [torch.Generator().manual_seed(settings.seed + start + i) for i in range(len(batch))]
        output = pipe(batch, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                      generator=generators, output_type="pt")
        images.append(output.images.float() * 2 - 1)
    return torch.cat(images)


def prompt_following(pipe, clip_model, tokenizer, count: int = 200, split: str = "heldout_a",
                     settings: SamplingSettings | None = None, progress: bool = False) -> dict:
    """Colour / shape accuracy of images generated from held-out one-object captions."""
    scenes = single_object_scenes(split, count)
    prompts = [s.caption() for s in scenes]
    images = generate(pipe, prompts, settings, progress)
    predictions = classify_color_shape(clip_model, tokenizer, images)
    truth = [(s.objects[0].color, s.objects[0].shape) for s in scenes]
    return {**accuracy_against(predictions, truth), "prompts": prompts, "predictions": predictions,
            "images": images}


def clip_fid(feature_module, first: torch.Tensor, second: torch.Tensor) -> float:
    """FID between two image sets (in [-1, 1]) on the given feature module's embeddings."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature_module, normalize=True)
    fid.update(((first + 1) / 2).clamp(0, 1), real=True)
    fid.update(((second + 1) / 2).clamp(0, 1), real=False)
    return float(fid.compute())


def real_images(split: str, count: int) -> torch.Tensor:
    from .scenes import to_tensor

    return to_tensor(np.stack([render_scene(world_scene(split, i)) for i in range(count)]))


def fid_report(pipe, feature_module, count: int = 500, settings: SamplingSettings | None = None,
               progress: bool = False) -> dict:
    """FID(generated from heldout_a captions, real heldout_b) and FID(real heldout_a, real heldout_b)."""
    prompts = [world_scene("heldout_a", i).caption() for i in range(count)]
    generated = generate(pipe, prompts, settings, progress)
    real_a, real_b = real_images("heldout_a", count), real_images("heldout_b", count)
    return {
        "fid_generated_vs_real": clip_fid(feature_module, real_b, generated),
        "fid_real_vs_real": clip_fid(feature_module, real_b, real_a),
        "count": count,
        "feature_dim": feature_module.num_features,
    }


# ---------------------------------------------------------------- the sample grid

GRID_PROMPTS = [
    "a red circle", "a blue square", "a yellow star", "a green triangle", "a purple heart", "an orange cross",
]


def grid_prompts(extra_single: int = 12, extra_pairs: int = 6) -> list[str]:
    """Short prompts, then full captions of held-out one-object and two-object scenes."""
    singles = [s.caption() for s in single_object_scenes("heldout_a", extra_single, start=10_000)]
    pairs, index = [], 10_000
    while len(pairs) < extra_pairs:
        scene = world_scene("heldout_a", index)
        if scene.relation is not None:
            pairs.append(scene.caption())
        index += 1
    return [*GRID_PROMPTS, *singles, *pairs]


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int = 6, scale: int = 2) -> Image.Image:
    """Images (N, 3, H, W in [-1, 1]) upscaled ``scale``× with their prompts wrapped beneath."""
    from .scenes import to_uint8

    arrays = to_uint8(images)
    cell = arrays.shape[1] * scale
    font = ImageFont.load_default(size=11) if hasattr(ImageFont, "load_default") else None
    wrapped = [textwrap.wrap(label, width=cell // 6) for label in labels]
    text_height = 13 * max(len(w) for w in wrapped) + 4
    rows = -(-len(arrays) // columns)
    grid = Image.new("RGB", (columns * (cell + 6) + 6, rows * (cell + text_height + 6) + 6), "white")
    draw = ImageDraw.Draw(grid)
    for index, (array, lines) in enumerate(zip(arrays, wrapped, strict=True)):
        x = 6 + (index % columns) * (cell + 6)
        y = 6 + (index // columns) * (cell + text_height + 6)
        grid.paste(Image.fromarray(array).resize((cell, cell), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return grid


def world_examples_grid(count: int = 18, split: str = "heldout_a", columns: int = 6) -> Image.Image:
    """Real scenes with their captions, to show what the world looks like."""
    scenes = [world_scene(split, i) for i in range(count)]
    return labelled_grid(real_images(split, count), [s.caption() for s in scenes], columns)


def quality_report(model_dir: str | Path, prompt_count: int = 200, fid_count: int = 500,
                   settings: SamplingSettings | None = None, progress: bool = True) -> dict:
    """Everything of point 5: prompt following, FIDs, zero-shot CLIP accuracy, and the grid image."""
    settings = settings or SamplingSettings()
    from ..metrics.features import ClipImageFeatures
    from .clip_model import zero_shot_accuracy

    model_dir = Path(model_dir)
    pipe = load_embedded_pipeline(model_dir)
    clip_model, tokenizer = load_world_clip(model_dir / "world_clip")
    features = ClipImageFeatures.from_pretrained(model_dir / "world_clip")
    zero_shot = zero_shot_accuracy(clip_model, tokenizer, "heldout_a", 1000)
    following = prompt_following(pipe, clip_model, tokenizer, prompt_count, "heldout_a", settings, progress)
    fids = fid_report(pipe, features, fid_count, settings, progress)
    prompts = grid_prompts()
    grid_settings = SamplingSettings(settings.steps, settings.guidance_scale, settings.seed + 7_000)
    grid = labelled_grid(generate(pipe, prompts, grid_settings), prompts)
    return {
        "sampling": {"steps": settings.steps, "guidance_scale": settings.guidance_scale,
                     "scheduler": type(pipe.scheduler).__name__, "seed": settings.seed},
        "clip_zero_shot_real_heldout_a": zero_shot,
        "generated_prompt_following": {k: following[k] for k in ACCURACY_KEYS},
        "fid": fids,
        "grid": grid,
        "examples": [{"prompt": p, "predicted": list(pred)} for p, pred in
                     zip(following["prompts"][:10], following["predictions"][:10], strict=True)],
    }


def markdown_table(report: dict) -> str:
    zero = report["clip_zero_shot_real_heldout_a"]
    gen = report["generated_prompt_following"]
    fid = report["fid"]
    sampling = report["sampling"]
    rows = [
        "| measurement | colour | shape | colour and shape | n |",
        "|---|---|---|---|---|",
        f"| world CLIP zero-shot, real held-out scenes | {zero['color']:.1%} | {zero['shape']:.1%} "
        f"| {zero['color_and_shape']:.1%} | {zero['count']} |",
        f"| generated from held-out captions ({sampling['steps']} steps, CFG {sampling['guidance_scale']}) "
        f"| {gen['color']:.1%} | {gen['shape']:.1%} | {gen['color_and_shape']:.1%} | {gen['count']} |",
        "",
        f"| FID, world-CLIP features (d = {fid['feature_dim']}), n = {fid['count']} per set | value |",
        "|---|---|",
        f"| generated (heldout_a captions) vs real heldout_b | {fid['fid_generated_vs_real']:.3f} |",
        f"| real heldout_a vs real heldout_b | {fid['fid_real_vs_real']:.3f} |",
    ]
    return "\n".join(rows)
