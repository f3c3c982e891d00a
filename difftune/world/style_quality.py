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

    python -m difftune.world.style_quality --measure docs/results/style_domains_embedded.json \
        --examples_grid docs/images/style_domains_base.png --num_threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import run_main
from ..io import write_json
from ..metrics.features import extract_features
from ..metrics.fid import fid_from_features
from ..paths import portable_path
from .quality import SamplingSettings, generate, labelled_grid
from .scenes import to_tensor, to_uint8
from .styles import PARTS, RENDER_VERSION, STYLES, add_domain_arguments, render_part, render_plain

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
            "extractor": _portable_extractor(getattr(extractor, "name", type(extractor).__name__)),
            "feature_dim": int(extractor.num_features),
            "resize": getattr(extractor, "describe_preprocessing", lambda: "")(),
            "statistics": "float64 (torchmetrics FrechetInceptionDistance on precomputed features)",
        },
        "domains": rows,
    }


def _portable_extractor(name: str) -> str:
    """``kind:path`` with a shipped path as ``assets/...`` (`paths.portable_path`): no machine paths."""
    kind, _, location = name.rpartition(":")
    location = portable_path(location)
    return f"{kind}:{location}" if kind else location


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


def measure(args: argparse.Namespace) -> None:
    """The base model's FID to every chosen style (and the plain world), as JSON."""
    import platform

    import torch

    from .._version import __version__
    from ..io import save_image
    from ..machine import cpu_name
    from ..metrics.cli import EMBEDDED_CLIP
    from ..metrics.fid import load_feature_extractor
    from ..model_factory import load_pipeline
    from .quality import SamplingSettings

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.time()
    pipe = load_pipeline(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clip = args.clip_model or EMBEDDED_CLIP
    extractor = load_feature_extractor(f"clip:{clip}")
    counts = {"train": args.train_images, "heldout": args.heldout_images, "reference": args.heldout_images}
    settings = SamplingSettings(steps=args.steps, guidance_scale=args.guidance_scale)
    report = measure_domains(pipe, extractor, args.styles, counts, settings, args.seed)
    report["settings"].update({
        "model": args.model, "clip_model": portable_path(clip), "render_version": RENDER_VERSION,
        "command": "python -m difftune.world.style_quality " + " ".join(argv_for_report(args)),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "difftune_version": __version__, "wall_seconds": round(time.time() - started, 1),
    })
    if args.examples_grid:
        save_image(args.examples_grid, examples_grid(report))
    write_json(args.measure, without_examples(report))
    print(markdown_table(report))
    print(f"report: {args.measure}")


def argv_for_report(args: argparse.Namespace) -> list[str]:
    """The flags of a --measure run, as a reader would type them (no machine paths for the outputs)."""
    parts = ["--styles", *args.styles, "--seed", str(args.seed), "--train_images", str(args.train_images),
             "--heldout_images", str(args.heldout_images), "--steps", str(args.steps),
             "--guidance_scale", str(args.guidance_scale), "--measure", args.measure.name]
    return parts + (["--num_threads", str(args.num_threads)] if args.num_threads else [])

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The base model's FID to each style domain of the embedded "
                                                 "world (and to the plain world), as JSON and a table.")
    parser.add_argument("--measure", type=Path, required=True, help="write the FID report (JSON) here")
    add_domain_arguments(parser)
    parser.add_argument("--examples_grid", type=Path,
                        help="real held-out images beside the base model's for their captions")
    parser.add_argument("--model", default="builtin:embedded", help="the base model")
    parser.add_argument("--clip_model", default=None,
                        help="folder of the CLIP whose image features FID uses (default: the world CLIP)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps of the base model")
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--num_threads", type=int, help="torch threads")
    args = parser.parse_args(argv)
    for flag in ("train_images", "heldout_images", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    measure(args)


if __name__ == "__main__":
    run_main(main)
