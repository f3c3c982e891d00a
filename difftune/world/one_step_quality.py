"""A one-step (HiPA) adapter measured in the embedded model's world, next to the base model.

Three generators draw the same held-out captions from the same noise: the one-step
student (the adapter), the base model's single step (the adapter at scale 0, the base
model exactly) and the multi-step teacher (the frozen base model with its full
sampler). Each is measured the way `difftune.world.quality` measures the base model:

* FID in world-CLIP image features against real ``heldout_b`` scenes, on the captions of
  the first ``count`` ``heldout_a`` scenes, with real ``heldout_a`` against real
  ``heldout_b`` beside it (the floor that sampling noise alone gives at this n);
* CLIP score (100·cos of world-CLIP image and caption embeddings) on the same captions;
* colour and shape accuracy on the first ``count`` one-object ``heldout_a`` captions,
  judged zero-shot by the world CLIP;
* seconds per image of each generator on this machine.

The teacher's samples are a `difftune.hipa.teacher` cache in the output folder: a rerun
skips what exists, so an interrupted evaluation continues where it stopped, and a rerun
with other teacher settings is refused instead of mixing two teachers.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..api import load_adapter, read_adapter_info
from ..hipa.evaluation import Comparison, adapter_scale, compare_with_teacher
from ..hipa.one_step import generate_one_step
from ..hipa.teacher import TeacherSettings, generate_teacher_samples, resolve_scheduler
from ..model_factory import EMBEDDED_MODEL_DIR
from .clip_model import accuracy_against, classify_color_shape, load_world_clip
from .quality import clip_fid, real_images
from .scenes import Scene, to_tensor, world_scene

GENERATORS = ("one-step student", "base one step", "teacher")


@dataclasses.dataclass(frozen=True)
class HeldOutCaptions:
    """Held-out scenes, each once: rows ``fid`` are the first scenes of the split (FID, CLIP
    score), rows ``accuracy`` its first one-object scenes (colour / shape accuracy)."""

    scenes: list[Scene]
    fid: list[int]
    accuracy: list[int]

    @property
    def prompts(self) -> list[str]:
        return [scene.caption() for scene in self.scenes]

    @property
    def truth(self) -> list[tuple[str, str]]:
        return [(self.scenes[i].objects[0].color, self.scenes[i].objects[0].shape) for i in self.accuracy]


def held_out_captions(count: int, split: str = "heldout_a") -> HeldOutCaptions:
    """The first ``count`` scenes and the first ``count`` one-object scenes of ``split``, merged."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    scenes: list[Scene] = []
    fid: list[int] = []
    accuracy: list[int] = []
    index = 0
    while len(fid) < count or len(accuracy) < count:
        scene = world_scene(split, index)
        for_fid = index < count
        for_accuracy = scene.relation is None and len(accuracy) < count
        if for_fid or for_accuracy:
            if for_fid:
                fid.append(len(scenes))
            if for_accuracy:
                accuracy.append(len(scenes))
            scenes.append(scene)
        index += 1
    return HeldOutCaptions(scenes, fid, accuracy)


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images → float (N, 3, H, W) in [-1, 1], the convention of the world CLIP."""
    return to_tensor(np.stack([np.asarray(image.convert("RGB")) for image in images]))


def seconds_per_image(generate: Callable[[list[str], torch.Tensor], Any], prompts: Sequence[str],
                      noises: torch.Tensor, batch_size: int) -> float:
    """Wall time per image of ``generate(prompts, noise)`` in batches, after one warm-up batch."""
    generate(list(prompts[:batch_size]), noises[:batch_size])
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        generate(list(prompts[start:start + batch_size]), noises[start:start + batch_size])
    return (time.perf_counter() - started) / len(prompts)


def generator_timings(pipe: Any, prompts: Sequence[str], noises: torch.Tensor, teacher: TeacherSettings,
                      batch_size: int) -> dict[str, float]:
    """Seconds per image of the three generators; the pipeline carries the adapter."""
    factor = pipe.vae_scale_factor
    size = {"height": noises.shape[-2] * factor, "width": noises.shape[-1] * factor}

    def one_step(batch: list[str], noise: torch.Tensor) -> Any:
        return generate_one_step(pipe, batch, latents=noise, output_type="pil", **size)

    def multi_step(batch: list[str], noise: torch.Tensor) -> Any:
        original, pipe.scheduler = pipe.scheduler, resolve_scheduler(pipe, teacher.scheduler)
        try:
            negative = [teacher.negative_prompt] * len(batch) if teacher.guidance_scale > 1 else None
            return pipe(batch, negative_prompt=negative, num_inference_steps=teacher.num_inference_steps,
                        guidance_scale=teacher.guidance_scale, latents=noise, output_type="pil", **size)
        finally:
            pipe.scheduler = original

    timings = {"one-step student": seconds_per_image(one_step, prompts, noises, batch_size)}
    with adapter_scale(pipe, 0.0):
        timings["base one step"] = seconds_per_image(one_step, prompts, noises, batch_size)
        timings["teacher"] = seconds_per_image(multi_step, prompts, noises, batch_size)
    return timings


def measure_columns(comparison: Comparison, captions: HeldOutCaptions, model_dir: Path,
                    progress: bool = True) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """FID, CLIP score and colour / shape accuracy of each column; and the real-vs-real FID."""
    from ..metrics import ClipSimilarity
    from ..metrics.features import ClipImageFeatures

    clip_dir = model_dir / "world_clip"
    clip_model, tokenizer = load_world_clip(clip_dir)
    features = ClipImageFeatures.from_pretrained(clip_dir)
    scorer = ClipSimilarity.from_pretrained(clip_dir)
    count = len(captions.fid)
    real_a, real_b = real_images("heldout_a", count), real_images("heldout_b", count)
    prompts = captions.prompts
    fid_prompts = [prompts[i] for i in captions.fid]
    rows: dict[str, dict[str, Any]] = {}
    columns = dict(zip(GENERATORS, (comparison.student, comparison.base_one_step, comparison.teacher),
                       strict=True))
    for name, images in tqdm(columns.items(), desc="metrics", unit="generator", disable=not progress):
        pixels = pil_to_tensor(images)
        fid_images = pixels[captions.fid]
        accuracy = accuracy_against(classify_color_shape(clip_model, tokenizer, pixels[captions.accuracy]),
                                    captions.truth)
        rows[name] = {
            "fid": clip_fid(features, real_b, fid_images),
            "clip_score": float(scorer.clip_score(((fid_images + 1) / 2).clamp(0, 1), fid_prompts).mean()),
            **{key: accuracy[key] for key in ("color", "shape", "color_and_shape")},
        }
    reference = {"fid_real_vs_real": clip_fid(features, real_b, real_a), "fid_count": count,
                 "accuracy_count": len(captions.accuracy), "feature_dim": features.num_features,
                 "extractor": "world CLIP image embeddings (assets/embedded_model/world_clip)",
                 "fid_reference": "real heldout_b scenes", "fid_captions": "heldout_a",
                 "real_vs_real": "real heldout_a vs real heldout_b"}
    return rows, reference


def comparison_grid(comparison: Comparison, rows: Sequence[int], scale: int = 2) -> Image.Image:
    """Rows of prompts; columns one-step student | base one step | teacher, headed, prompts beneath."""
    font = ImageFont.load_default(size=11) if hasattr(ImageFont, "load_default") else None
    size = comparison.student[0].size[0] * scale
    pad, header, caption_width = 6, 16, 260
    width = pad + 3 * (size + pad) + caption_width
    grid = Image.new("RGB", (width, header + len(rows) * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(GENERATORS):
        draw.text((pad + column * (size + pad), 2), name, fill="black", font=font)
    for row, index in enumerate(rows):
        y = header + row * (size + pad)
        for column, images in enumerate((comparison.student, comparison.base_one_step, comparison.teacher)):
            picture = images[index].convert("RGB").resize((size, size), Image.NEAREST)
            grid.paste(picture, (pad + column * (size + pad), y))
        caption = "\n".join(textwrap.wrap(comparison.prompts[index], width=42))
        draw.multiline_text((pad + 3 * (size + pad), y + 4), caption, fill="black", font=font)
    return grid


def one_step_report(adapter: str | Path, output_dir: str | Path, count: int = 300,
                    teacher: TeacherSettings | None = None, model_dir: str | Path = EMBEDDED_MODEL_DIR,
                    batch_size: int = 25, timing_images: int = 50, grid_rows: int = 8,
                    resolution: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Everything of the one-step table for one adapter file; the grid image under ``"grid"``.

    The teacher cache lives in ``<output_dir>/teacher`` (resumable). The returned dict is
    JSON-ready apart from ``"grid"``. ``resolution`` defaults to the model's own (the world
    CLIP judges 64×64 images, the embedded model's size).
    """
    from ..model_factory import load_pipeline

    teacher = teacher or TeacherSettings()
    teacher.validate()
    captions = held_out_captions(count)
    model_dir = Path(model_dir)
    model = "builtin:embedded" if model_dir.resolve() == EMBEDDED_MODEL_DIR.resolve() else str(model_dir)
    pipe = load_pipeline(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cache = generate_teacher_samples(pipe, captions.prompts, Path(output_dir) / "teacher", teacher,
                                     height=resolution, width=resolution, batch_size=batch_size,
                                     model_name=model, show_progress=progress)
    load_adapter(pipe, adapter)
    comparison = compare_with_teacher(pipe, cache, batch_size=batch_size)
    rows, reference = measure_columns(comparison, captions, model_dir, progress)
    timing_rows = captions.fid[:timing_images]
    noises = torch.stack([cache[i]["noise"] for i in timing_rows])
    timings = generator_timings(pipe, [captions.prompts[i] for i in timing_rows], noises, teacher, batch_size)
    for name, seconds in timings.items():
        rows[name]["seconds_per_image"] = seconds
    return {
        "adapter": str(adapter),
        "adapter_info": read_adapter_info(adapter),
        "model": model,
        "teacher": dataclasses.asdict(teacher) | {"scheduler_class": cache.manifest["scheduler_class"]},
        "generators": rows,
        "reference": reference,
        "timing": {"images": len(timing_rows), "batch_size": batch_size, "threads": torch.get_num_threads(),
                   "what": "wall seconds per image, PIL output, after one warm-up batch"},
        "grid": comparison_grid(comparison, captions.accuracy[:grid_rows]),
    }


def one_step_markdown(report: dict[str, Any]) -> str:
    """The table of a `one_step_report`: one row per generator, settings beneath."""
    reference, teacher = report["reference"], report["teacher"]
    lines = ["| generator | FID ↓ | CLIP score ↑ | colour ↑ | shape ↑ | colour and shape ↑ | s / image |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["generators"].items():
        label = f"teacher ({teacher['num_inference_steps']} steps, CFG {teacher['guidance_scale']:g})" \
            if name == "teacher" else name
        lines.append(f"| {label} | {row['fid']:.1f} | {row['clip_score']:.1f} | {row['color']:.1%} | "
                     f"{row['shape']:.1%} | {row['color_and_shape']:.1%} | {row['seconds_per_image']:.4f} |")
    lines.append(f"| real held-out scenes (real vs real) | {reference['fid_real_vs_real']:.1f} | | | | | |")
    timing = report["timing"]
    ref = reference
    lines += ["", f"FID: {ref['extractor']}, d = {ref['feature_dim']}, n = {ref['fid_count']} "
              f"{ref['fid_captions']} captions against {ref['fid_count']} {ref['fid_reference']}; "
              f"CLIP score on the same captions; colour / shape: world-CLIP zero-shot on the first "
              f"{ref['accuracy_count']} one-object {ref['fid_captions']} captions; time: "
              f"{timing['images']} images, batch {timing['batch_size']}, {timing['threads']} thread(s)."]
    return "\n".join(lines)
