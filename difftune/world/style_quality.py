"""How far is the base model from each style domain? FID in world-CLIP features, with its floors.

For every style (and the plain world as a reference row) the base model draws the held-out
captions (``"<name> style, <world caption>"``), and its images are compared with the domain's real
held-out images and with its training set, as SaRA compares against the training set. Beside
each FID stand the numbers that say what it means:

- ``floor_*``: a second real set of the domain (the ``reference`` part) against the same images,
  the FID that sampling noise alone gives at these counts: no model can be expected below it;
- ``plain_world``: the plain world's renders of the held-out scenes against their styled
  versions: how far the style moves the images, in the same features;
- ``vae``: the reference set passed through the model's VAE against the held-out set: the
  best any denoiser fine-tune can reach, since every image it draws goes through that decoder.

Features are the world CLIP's projected image embeddings (`difftune.metrics.fid`, float64
statistics), the extractor the world quality evaluation and the benchmarks use.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..metrics.features import extract_features
from ..metrics.fid import fid_from_features
from .quality import SamplingSettings, generate, labelled_grid
from .scenes import to_tensor, to_uint8
from .styles import PARTS, STYLES, render_part, render_plain

PLAIN = "plain"  # the plain world's row


def _features(extractor, images: np.ndarray | torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) \
        if isinstance(images, np.ndarray) else images
    return extract_features(extractor, pixels, batch_size)


def vae_round_trip(pipe, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """uint8 images through the pipeline's VAE (encode, decode the latent mean)."""
    vae = pipe.vae
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = to_tensor(images[start:start + batch_size]).to(vae.device, vae.dtype)
            decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
            out.append(to_uint8(decoded))
    return np.concatenate(out)


def _fid(real: torch.Tensor, other: torch.Tensor, extractor) -> dict[str, Any]:
    result = fid_from_features(real, other, extractor, kid=False)
    return {"fid": round(result.fid, 4), "real_count": result.real_count,
            "other_count": result.generated_count}


def measure_domain(pipe, extractor, name: str, counts: dict[str, int], settings: SamplingSettings,
                   seed: int = 0, plain_heldout: torch.Tensor | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """The FIDs of one style (or ``PLAIN``) and the seconds its images took to render and generate;
    ``plain_heldout``: features of the plain world's held-out renders (for ``plain_world_vs_heldout``)."""
    started = time.perf_counter()
    if name == PLAIN:
        parts = {part: render_plain(part, counts[part], seed) for part in PARTS}
    else:
        parts = {part: render_part(name, part, counts[part], seed) for part in PARTS}
    render_seconds = time.perf_counter() - started
    real = {part: _features(extractor, images) for part, (images, _) in parts.items()}
    started = time.perf_counter()
    generated = generate(pipe, parts["heldout"][1], settings, progress)
    generate_seconds = time.perf_counter() - started
    base = _features(extractor, ((generated + 1) / 2).clamp(0, 1))
    vae = _features(extractor, vae_round_trip(pipe, parts["reference"][0]))
    row = {
        "base_vs_heldout": _fid(real["heldout"], base, extractor),
        "base_vs_train": _fid(real["train"], base, extractor),
        "floor_heldout": _fid(real["heldout"], real["reference"], extractor),
        "floor_train": _fid(real["train"], real["reference"], extractor),
        "vae_vs_heldout": _fid(real["heldout"], vae, extractor),
        "seconds": {"render": round(render_seconds, 2), "render_images": sum(counts.values()),
                    "generate": round(generate_seconds, 1), "generated_images": len(generated)},
    }
    if name != PLAIN:
        if plain_heldout is None:
            plain_heldout = _features(extractor, render_plain("heldout", counts["heldout"], seed)[0])
        row["plain_world_vs_heldout"] = _fid(real["heldout"], plain_heldout, extractor)
        row["kind"], row["description"] = STYLES[name].kind, STYLES[name].description
    row["examples"] = {"captions": parts["heldout"][1][:4], "real": parts["heldout"][0][:4],
                       "generated": to_uint8(generated[:4])}
    return row


def measure_domains(pipe, extractor, styles: list[str] | None = None, counts: dict[str, int] | None = None,
                    settings: SamplingSettings | None = None, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Every style's row and the plain world's; ``counts`` per part (default 300 / 500 / 500)."""
    from tqdm.auto import tqdm

    settings = settings or SamplingSettings()
    counts = {part: default for part, (_, default) in PARTS.items()} | (counts or {})
    names = [PLAIN, *(styles or list(STYLES))]
    plain = _features(extractor, render_plain("heldout", counts["heldout"], seed)[0])
    rows = {name: measure_domain(pipe, extractor, name, counts, settings, seed, plain)
            for name in tqdm(names, desc="style domains", unit="domain", disable=not progress)}
    return {
        "settings": {
            "counts": counts, "seed": seed,
            "sampling": {"steps": settings.steps, "guidance_scale": settings.guidance_scale,
                         "seed": settings.seed, "scheduler": type(pipe.scheduler).__name__},
            "extractor": _portable_name(getattr(extractor, "name", type(extractor).__name__)),
            "feature_dim": int(extractor.num_features),
            "resize": getattr(extractor, "describe_preprocessing", lambda: "")(),
            "statistics": "float64 (torchmetrics FrechetInceptionDistance on precomputed features)",
        },
        "domains": rows,
    }


def examples_grid(report: dict[str, Any], scale: int = 2) -> Image.Image:
    """Per domain, four held-out scenes: the real image, then what the base model draws for its caption."""
    images, labels = [], []
    for name, row in report["domains"].items():
        examples = row["examples"]
        for index in range(len(examples["captions"])):
            images += [examples["real"][index], examples["generated"][index]]
            labels += [f"{name}: real", "base model"]
    return labelled_grid(to_tensor(np.stack(images)), labels, columns=8, scale=scale)


def without_examples(report: dict[str, Any]) -> dict[str, Any]:
    """The report as JSON wants it: the example images left out."""
    domains = {name: {k: v for k, v in row.items() if k != "examples"}
               for name, row in report["domains"].items()}
    return {**report, "domains": domains}


def _portable_name(name: str) -> str:
    """The extractor name, a path inside the package made relative to it (no machine paths in reports)."""
    kind, _, location = name.rpartition(":")
    package = Path(__file__).resolve().parents[1]
    try:
        location = Path(location).resolve().relative_to(package).as_posix()
    except ValueError:
        return name
    return f"{kind}:{location}" if kind else location


def markdown_table(report: dict[str, Any]) -> str:
    counts = report["settings"]["counts"]
    rows = [f"| domain | kind | base → held-out ({counts['heldout']}) | floor | "
            f"base → train ({counts['train']}) | floor | through the VAE | plain world → held-out |",
            "|---|---|---|---|---|---|---|---|"]
    for name, row in report["domains"].items():
        plain = row.get("plain_world_vs_heldout", {}).get("fid")
        rows.append(f"| {name} | {row.get('kind', 'none')} | {row['base_vs_heldout']['fid']:.1f} | "
                    f"{row['floor_heldout']['fid']:.1f} | {row['base_vs_train']['fid']:.1f} | "
                    f"{row['floor_train']['fid']:.1f} | {row['vae_vs_heldout']['fid']:.1f} | "
                    f"{'–' if plain is None else f'{plain:.1f}'} |")
    return "\n".join(rows)
