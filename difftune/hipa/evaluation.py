"""One-step student vs base one-step vs teacher: the same prompts and the same noise for all three.

Used twice: by validation during training (a few prompts, images only) and by the
evaluation after it (held-out prompts, FID and CLIP score). The teacher's images and
the noise come from a teacher cache (`difftune.hipa.teacher`); the base model's one-step
images come from the same pipeline with the adapter at scale 0, which is the base
model exactly, so no second pipeline is needed.

Metrics are reached through a small interface (`OneStepMetrics`) so that any FID /
CLIP implementation plugs in.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from ..api import find_denoiser, get_adapter
from .one_step import generate_one_step
from .teacher import TeacherCache

COLUMNS = ("one-step student", "base one-step", "teacher")


@contextlib.contextmanager
def adapter_scale(pipe: Any, scale: float) -> Iterator[None]:
    """Run the block with the adapter at ``scale`` (0 = the base model exactly), then restore it."""
    adapter = get_adapter(pipe)
    previous = adapter.scale
    adapter.set_scale(scale)
    try:
        yield
    finally:
        adapter.set_scale(previous)


@dataclasses.dataclass
class Comparison:
    """Images of the three generators for the same prompts and noise, in prompt order."""

    prompts: list[str]
    student: list[Image.Image]
    base_one_step: list[Image.Image]
    teacher: list[Image.Image]

    def columns(self) -> dict[str, list[Image.Image]]:
        return dict(zip(COLUMNS, (self.student, self.base_one_step, self.teacher), strict=True))

    def side_by_side(self) -> list[Image.Image]:
        """Row-major: student, base one-step, teacher for each prompt (a grid of 3 columns)."""
        return [image for row in zip(self.student, self.base_one_step, self.teacher, strict=True)
                for image in row]


@torch.no_grad()
def one_step_images(pipe: Any, prompts: Sequence[str], noises: torch.Tensor, height: int, width: int,
                    batch_size: int = 8) -> list[Image.Image]:
    """One-step images of ``prompts``, image i starting from ``noises[i]``."""
    denoiser, _ = find_denoiser(pipe)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        latents = noises[start:start + batch_size].to(pipe.device, denoiser.dtype)
        output = generate_one_step(pipe, list(prompts[start:start + batch_size]), height=height, width=width,
                                   latents=latents, output_type="pil")
        images.extend(output.images)
    return images


def compare_with_teacher(pipe: Any, cache: TeacherCache, indices: Sequence[int] | None = None,
                         batch_size: int = 8) -> Comparison:
    """Student (adapter on) and base (adapter at 0) one-step images next to the cached teacher's."""
    indices = list(range(len(cache))) if indices is None else list(indices)
    samples = [cache[i] for i in indices]
    prompts = [s["prompt"] for s in samples]
    noises = torch.stack([s["noise"] for s in samples])
    height, width = cache.manifest["height"], cache.manifest["width"]
    student = one_step_images(pipe, prompts, noises, height, width, batch_size)
    with adapter_scale(pipe, 0.0):
        base = one_step_images(pipe, prompts, noises, height, width, batch_size)
    return Comparison(prompts, student, base, [cache.image(i) for i in indices])


class OneStepMetrics(Protocol):
    """What the evaluation needs from a metrics implementation."""

    def fid(self, reference: Sequence[Image.Image], generated: Sequence[Image.Image]
            ) -> dict[str, Any] | None:
        """FID of ``generated`` against ``reference``: ``{"fid": float, ...how it was measured}``,
        or None when this implementation computes no FID."""

    def clip_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        """Mean CLIP score of image i with prompt i."""


class DifftuneMetrics:
    """`OneStepMetrics` on ``difftune.metrics``: CLIP score (100·cos, floored at 0) and FID/KID.

    ``clip_model`` is a CLIP hub id or local folder; ``fid_extractor`` a spec of
    `difftune.metrics.load_feature_extractor` (``inception``, ``clip:<model>``, ...) or
    None for no FID. Every FID comes with its extractor, resize mode and sample counts.
    """

    def __init__(self, clip_model: str, fid_extractor: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32):
        from ..metrics import ClipSimilarity, load_feature_extractor

        options = {"device": device, "dtype": dtype, "batch_size": batch_size}
        self.clip = ClipSimilarity.from_pretrained(clip_model, **options)
        self.extractor = load_feature_extractor(fid_extractor, **options) if fid_extractor else None
        self.batch_size = batch_size

    def to(self, device: str | torch.device) -> DifftuneMetrics:
        self.clip.to(device)
        if self.extractor is not None:
            self.extractor.to(device)
        return self

    def fid(self, reference: Sequence[Image.Image], generated: Sequence[Image.Image]
            ) -> dict[str, Any] | None:
        from ..metrics import compute_fid

        if self.extractor is None:
            return None
        return compute_fid(list(reference), list(generated), self.extractor, batch_size=self.batch_size,
                           progress=False).to_dict()

    def clip_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        return float(self.clip.clip_score(list(images), list(prompts)).mean())


def evaluate_comparison(comparison: Comparison, metrics: OneStepMetrics,
                        reference: Sequence[Image.Image] | None = None) -> dict[str, dict[str, Any]]:
    """FID and CLIP score of each column.

    FID is measured against ``reference`` (real images) when given; without it the
    teacher's samples are the reference, so the two one-step columns get an
    "FID to teacher" and the teacher row has none. Each row says which.
    """
    reference_name = "real images" if reference is not None else "teacher samples"
    results: dict[str, dict[str, Any]] = {}
    for name, images in comparison.columns().items():
        row: dict[str, Any] = {"images": len(images),
                               "clip_score": float(metrics.clip_score(images, comparison.prompts))}
        if reference is not None or name != "teacher":
            fid = metrics.fid(reference if reference is not None else comparison.teacher, images)
            if fid is not None:
                row["fid"] = fid
                row["fid_reference"] = reference_name
        results[name] = row
    return results


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The results as a Markdown table; each FID carries the setting it was measured in."""
    lines = ["| generator | images | CLIP score | FID | FID reference | FID setting |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        fid = row.get("fid")
        if fid is None:
            fid_text, setting = "—", "—"
        else:
            fid_text = f"{fid['fid']:.3f}"
            setting = ", ".join(str(fid[k]) for k in ("extractor", "num_features", "resize") if k in fid)
            if "real_count" in fid:
                setting += f", {fid['real_count']} reference / {fid['generated_count']} generated"
        lines.append(f"| {name} | {row['images']} | {row['clip_score']:.3f} | {fid_text} | "
                     f"{row.get('fid_reference', '—')} | {setting} |")
    return "\n".join(lines) + "\n"
