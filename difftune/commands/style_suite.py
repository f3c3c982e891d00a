"""The style benchmark: SaRA's own experiment, fine-tuning on a dataset of a new style, on the embedded
world's five style domains; every method against LoRA, and what each one forgets.

    # run (or resume: everything lives on disk) the grid of the embedded preset
    difftune benchmark --style_suite --output_dir runs/style_benchmark
    # the report from partial or complete results: JSON, plots, the markdown table
    difftune benchmark --style_suite --output_dir runs/style_benchmark --report_only --report_dir docs

    # one grid on several machines or GPUs: each runs a --methods subset into its own folder (with
    # the same settings), then one folder takes the others' cells and writes the report
    difftune benchmark --style_suite --output_dir runs/a --merge_from runs/b --report_dir docs

    # SaRA's gap to Super-Tuning taken apart (rows not in the default grid; see SARA_ABLATIONS):
    # the rows already in the folder are reused, the new ones swept, trained and scored
    difftune benchmark --style_suite --output_dir runs/style_benchmark --levels 20M \
        --methods lora sara supertuning sara_attnff sara_attnff_norank sara_attnff_plain

(``python eval/benchmark.py --style_suite ...`` in a checkout is the same.)

The protocol (the numbers of each preset are in STYLE_PRESETS):

1. **Domains** (`difftune.world.styles`): each style's training images, captioned "<style> style, <world
   caption>"; of its held-out images the first ``test_captions`` give the test captions and the FID
   reference, the next ``validation_captions`` the validation captions (disjoint from the test ones).
2. **Budgets.** SD 1.5's 5M / 20M / 50M trainable parameters of its 859.5M-weight UNet are 0.58 / 2.3 /
   5.8 % of a denoiser: the same fractions of this model's denoiser. A method with a size knob (LoRA,
   DoRA, LoHa, SHiRA: the rank; SaRA: its budget; Super-Tuning: its sparsity) gets the setting whose
   trainable count, counted on the model itself, is nearest each level. LoRA and SaRA run at all three
   levels (the budget curve), the other knob methods at 20M; SVFit, TLoRA, OFT and LoKr at their
   defaults, full fine-tuning (`full_ft`) on every weight.
3. **Learning rates.** Every method (at 20M) trains on the first domain at each rate of its grid (seed
   ``sweep_seed``, not a test seed) and draws the validation captions; the rate with the lowest FID
   against the domain's held-out images is kept (``sweep/selection.json``) for every domain and level.
   A winner on an edge of the grid adds up to ``sweep_extensions`` rates beyond it (×3 up, ÷3 down),
   as the subject suite does: a method whose best rate is its largest may learn faster still.
4. **The grid.** Every method × domain × seed trains with ``difftune train-text-to-image`` and is
   scored at each of ``checkpoint_steps`` (a ``--curve_methods`` method at the matched budget; the
   others and the budget curve's other levels at the last one): the test captions give FID against the
   held-out domain images and against the training set (as the paper measures) and the CLIP score
   (100 · cosine of world-CLIP image and caption embeddings; the caption without its style prefix, a
   phrase the world CLIP never saw); plain world captions of one object (no prefix) give what is
   forgotten: colour and shape accuracy (world-CLIP zero-shot), FID against real world scenes, and
   drift, 1 − cosine between the world-CLIP embeddings of its image and the base model's image of the
   same caption and seed.
5. **The report.** Per method and checkpoint the mean over domains with a 95 % two-stage bootstrap
   interval (domains and seeds, then prompts; FID recomputed on resampled images, bias-corrected: see
   `bootstrap_grouped`), the paired difference to LoRA at the same budget, VLHI within the group of
   methods at the matched budget (20M) and without one, at the last checkpoint; plots of FID against
   drift over checkpoints and of FID against trainable parameters.

The grid runs row by row (a method's sweep just before its rows; the matched budget first, in
`STYLE_METHODS` order), so a partial run holds whole methods over every domain. Trained runs are not
retrained (an interrupted one continues from its last checkpoint) and a scored checkpoint is not
rescored; a progress bar counts the grid's cells. ``--report_only`` trains nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.errors import DifftuneError
from difftune.io import read_json, write_json
from difftune.machine import machine_description
from difftune.metrics.cli import EMBEDDED_CLIP
from difftune.paths import portable_path

from .benchmark_runs import (
    ADAPTER_FILE,
    METHOD_COLORS,
    copy_missing_files,
    parse_with_preset,
    record_time,
    run_trainer,
)

TRAINER_MODULE = "difftune.commands.train_text_to_image"
RESULT_FILE = "style_benchmark.json"
BASELINE = "lora"
SD15_UNET_WEIGHTS = 859_520_964  # the SD 1.5 UNet's parameters: the paper's budgets are fractions of it
LEVELS = {"5M": 5e6, "20M": 20e6, "50M": 50e6}  # SaRA's budgets on SD 1.5
MATCHED = "20M"
# The paper's table (SD 1.5, mean of five style datasets at the 50M budget): FID / CLIP / VLHI.
PAPER = {"sara": (134.96, 27.08, 1.55), "lora": (150.74, 27.96, 1.45), "dora": (146.22, 27.82, 1.53),
         "full_ft": (133.69, 26.42, 1.30)}
METRICS = {  # name -> (heading, higher is better)
    "fid_heldout": ("FID held-out ↓", False), "fid_train": ("FID train ↓", False),
    "clip": ("CLIP ↑", True), "color": ("colour acc ↑", True), "shape": ("shape acc ↑", True),
    "fid_world": ("FID world ↓", False), "drift": ("drift ↓", False),
}
SET_METRICS = {"fid_heldout": "styled", "fid_train": "styled", "fid_world": "plain"}  # features they need


@dataclass(frozen=True)
class StyleMethod:
    """A method of the suite: its adapter, fixed options, the knob that sets its budget and the levels
    it runs at (none: its own defaults)."""

    name: str
    adapter: str
    options: dict[str, Any] = field(default_factory=dict)
    knob: str | None = None  # rank, budget (SaRA) or sparsity (Super-Tuning)
    levels: tuple[str, ...] = (MATCHED,)


# In the order the grid runs them (a partial run holds the first ones on every domain): the paper's
# comparison first (LoRA, SaRA, full fine-tuning, DoRA), then Super-Tuning, then the others.
STYLE_METHODS = (
    StyleMethod("lora", "lora", {"targets": "attn"}, "rank", tuple(LEVELS)),
    StyleMethod("sara", "sara", {}, "budget", tuple(LEVELS)),
    StyleMethod("full_ft", "full_ft", {}, None, ()),
    StyleMethod("dora", "peft", {"type": "dora", "targets": "attn"}, "rank"),
    # Super-Tuning: the smallest-magnitude entries, as SaRA selects (without its hook or low-rank loss),
    # on every Linear of the transformer blocks (peft's Super-Tuning adapts Linear layers only)
    StyleMethod("supertuning", "peft", {"type": "supertuning", "targets": "attn-ff",
                                        "options": {"select_top": False}}, "sparsity"),
    StyleMethod("svfit", "svfit", {}, None, ()),
    StyleMethod("tlora", "tlora", {}, None, ()),
    StyleMethod("loha", "peft", {"type": "loha", "targets": "attn"}, "rank"),
    # LoKr at its defaults: on layers this small its count does not grow with the rank (no budget knob)
    StyleMethod("lokr", "peft", {"type": "lokr", "targets": "attn"}, None, ()),
    StyleMethod("oft", "peft", {"type": "oft", "targets": "attn"}, None, ()),
    StyleMethod("shira", "peft", {"type": "shira", "targets": "attn"}, "rank"),
)
# Rows that separate SaRA's gap to Super-Tuning (the same smallest-magnitude selection at the same
# count): SaRA on Super-Tuning's layers (every Linear of the transformer blocks instead of every Linear
# and Conv2d), then without its low-rank loss, then also without its progressive step (Super-Tuning's
# recipe with SaRA's global threshold and hook). Not in the default grid: ask for them with --methods.
SARA_ABLATIONS = (
    StyleMethod("sara_attnff", "sara", {"targets": "attn-ff"}, "budget"),
    StyleMethod("sara_attnff_norank", "sara", {"targets": "attn-ff", "lambda_rank": 0}, "budget"),
    StyleMethod("sara_attnff_plain", "sara", {"targets": "attn-ff", "lambda_rank": 0, "progressive_step": 0},
                "budget"),
)
# The paired differences the ablation rows answer (row − other), each where both rows are scored.
ABLATION_PAIRS = (("sara_attnff", "sara"), ("sara_attnff", "supertuning"),
                  ("sara_attnff_norank", "sara_attnff"), ("sara_attnff_plain", "sara_attnff_norank"),
                  ("sara_attnff_plain", "sara_attnff"), ("sara_attnff_plain", "supertuning"))
METHODS_BY_NAME = {method.name: method for method in STYLE_METHODS + SARA_ABLATIONS}

# Learning-rate grids (each around the measured subject recipes of difftune/training/recipes.py).
_RATES = {"lora": (3e-4, 1e-3, 3e-3), "sara": (1e-3, 3e-3, 1e-2), "svfit": (1e-3, 3e-3, 1e-2),
          "tlora": (3e-4, 1e-3, 3e-3), "full_ft": (3e-5, 1e-4, 3e-4), "dora": (3e-4, 1e-3, 3e-3),
          "loha": (3e-4, 1e-3, 3e-3), "lokr": (3e-4, 1e-3, 3e-3), "oft": (3e-4, 1e-3, 3e-3),
          "shira": (3e-4, 1e-3, 3e-3), "supertuning": (1e-3, 3e-3, 1e-2)}
_RATES.update({ablation.name: _RATES["sara"] for ablation in SARA_ABLATIONS})  # SaRA's grid

STYLE_PRESETS: dict[str, dict[str, Any]] = {
    # Sized for the 2-core CPU from one measured cell (docs/benchmarks.md): one seed per domain, 300
    # steps, 8 sampler steps (the base model's FID to a style at 8 steps is its FID at 25; at 6 its
    # colour accuracy drops), the base model's images drawn once; every checkpoint scored for the
    # paper's methods and Super-Tuning, the last one for the others and the budget curve's other levels.
    "embedded": {
        "pretrained_model_name_or_path": "builtin:embedded", "clip_model": str(EMBEDDED_CLIP),
        "styles": None, "seeds": [0], "train_images": 300, "test_captions": 300,
        "validation_captions": 64, "plain_captions": 100, "world_images": 300,
        "max_train_steps": 300, "checkpoint_steps": [75, 150, 300], "train_batch_size": 4,
        "num_inference_steps": 8, "guidance_scale": 5.0, "generation_batch": 100,
        "sweep_seed": 100, "learning_rates": _RATES,
        "curve_methods": ["lora", "sara", "full_ft", "dora", "supertuning"],
    },
}


# ---------------------------------------------------------------- options

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difftune benchmark --style_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(STYLE_PRESETS), default="embedded",
                        help="defaults for everything below")
    parser.add_argument("--output_dir", type=Path, required=True, help="runs, scores, caches (resumable)")
    parser.add_argument("--report_only", action="store_true", help="write the report from what exists")
    parser.add_argument("--merge_from", type=Path, nargs="+", default=[],
                        help="folders of the same grid run elsewhere (a --methods subset each, stopped): "
                             "their cells are copied in, then the report is written (trains nothing)")
    parser.add_argument("--report_dir", type=Path,
                        help="also write the report's JSON (results/style_benchmark_embedded.json), plots "
                             "(images/) and table here, e.g. docs")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS_BY_NAME),
                        default=[m.name for m in STYLE_METHODS],
                        help="methods of the grid (lora is the baseline); the SaRA ablation rows ("
                             + ", ".join(m.name for m in SARA_ABLATIONS) + ") only when named")
    parser.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS),
                        help="budget levels of the budget curve (LoRA and SaRA)")
    parser.add_argument("--styles", nargs="+", help="style domains (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds per domain")
    parser.add_argument("--pretrained_model_name_or_path")
    parser.add_argument("--clip_model", help="folder of the world CLIP (FID features, CLIP score, accuracy)")
    for name in ("train_images", "test_captions", "validation_captions", "plain_captions", "world_images",
                 "max_train_steps", "train_batch_size", "num_inference_steps", "generation_batch",
                 "sweep_seed"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--checkpoint_steps", nargs="+", type=int, help="steps scored (the last: the end)")
    parser.add_argument("--curve_methods", nargs="*", choices=list(METHODS_BY_NAME),
                        help="methods scored at every checkpoint at the matched budget (their curves over "
                             "training); the others and the budget curve's other levels at the last one")
    parser.add_argument("--guidance_scale", type=float)
    parser.add_argument("--rates", type=int, choices=(1, 2, 3), default=3,
                        help="rates of each method's grid to sweep (1: its middle one, no sweep)")
    parser.add_argument("--sweep_extensions", type=int, default=4,
                        help="rates tried past an edge of a method's grid when the edge rate wins "
                             "(x3 up, /3 down; the methods' best rates span more than two decades)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap replicates (FID: a fifth)")
    parser.add_argument("--data_dir", type=Path,
                        help="where the rendered domains go (default: <output_dir>/data)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_preset(parser, STYLE_PRESETS, argv)
    from difftune.world.styles import STYLES

    args.styles = args.styles or list(STYLES)
    unknown = sorted(set(args.styles) - set(STYLES))
    if unknown:
        parser.error(f"--styles: unknown {', '.join(unknown)} (styles: {', '.join(STYLES)})")
    if BASELINE not in args.methods:
        parser.error("--methods must include lora, the baseline")
    steps = args.checkpoint_steps
    if sorted(steps) != steps or steps[-1] != args.max_train_steps:
        parser.error("--checkpoint_steps must rise and end at --max_train_steps")
    if MATCHED not in args.levels:
        parser.error(f"--levels must include {MATCHED}, the matched budget")
    args.data_dir = args.data_dir or args.output_dir / "data"
    return args


# ---------------------------------------------------------------- rows, budgets, commands

@dataclass(frozen=True)
class Row:
    """One row of the table: a method at one budget level (or at its defaults)."""

    method: StyleMethod
    level: str | None

    @property
    def name(self) -> str:
        return f"{self.method.name}@{self.level}" if self.level else self.method.name

    @property
    def baseline(self) -> str:
        """The LoRA row this row is compared with (the same budget, else the matched one)."""
        return f"{BASELINE}@{self.level or MATCHED}"


def suite_rows(args: argparse.Namespace) -> list[Row]:
    """The rows in the order the grid runs them: every method at the matched budget (or its defaults)
    in `STYLE_METHODS` order, then the SaRA ablation rows asked for, then the budget curve's other
    levels."""
    methods = [method for method in STYLE_METHODS + SARA_ABLATIONS if method.name in args.methods]
    rows = [Row(method, MATCHED if method.levels else None) for method in methods]
    return rows + [Row(method, level) for method in methods for level in method.levels
                   if level != MATCHED and level in args.levels]


def scored_steps(args: argparse.Namespace, row: Row) -> list[int]:
    """The checkpoints a row is scored at: every one for a ``--curve_methods`` method at the matched
    budget (its curve over training), the last one otherwise (a budget curve's point, a final score)."""
    if row.level in (None, MATCHED) and row.method.name in args.curve_methods:
        return list(args.checkpoint_steps)
    return [args.checkpoint_steps[-1]]


def option_flags(adapter: str, options: dict[str, Any]) -> list[str]:
    """Trainer flags of a method's options (``--targets``, ``--rank``, ``--peft_type``, ...)."""
    from difftune.training.arguments import option_dest

    flags = []
    for name, value in options.items():
        dest = "targets" if name == "targets" else option_dest(adapter, name)
        flags += [f"--{dest}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


class BudgetCounter:
    """Trainable counts of a method's settings on the model's own denoiser (attached, counted, removed)."""

    def __init__(self, model: str):
        from difftune.api import find_denoiser
        from difftune.model_factory import load_pipeline

        self.denoiser, _ = find_denoiser(load_pipeline(model))
        self.total = sum(p.numel() for p in self.denoiser.parameters())

    def count(self, adapter: str, options: dict[str, Any]) -> int:
        import difftune

        difftune.add_adapter(self.denoiser, adapter, **options)
        try:
            return difftune.count_trainable_parameters(self.denoiser)
        finally:
            difftune.remove_adapter(self.denoiser)

    def target(self, level: str) -> int:
        return round(self.total * LEVELS[level] / SD15_UNET_WEIGHTS)

    def options_for(self, row: Row) -> tuple[dict[str, Any], int]:
        """The row's options with its knob set to meet its level, and the trainable count they give."""
        method, options = row.method, dict(row.method.options)
        if row.level is None:
            return options, self.count(method.adapter, options)
        target = self.target(row.level)
        if method.knob == "budget":
            options["budget"] = target
        elif method.knob == "sparsity":  # a kept share of the targeted entries: count it at one sparsity
            probe = {**options, "options": {**options.get("options", {}), "sparsity": 0.5}}
            targeted = 2 * self.count(method.adapter, probe)
            options["options"] = {**options.get("options", {}), "sparsity": round(1 - target / targeted, 6)}
        else:  # rank: counts grow linearly with it; the nearest of the neighbours of the linear guess
            one = self.count(method.adapter, {**options, "rank": 1})
            two = self.count(method.adapter, {**options, "rank": 2})
            guess = max(1, round(1 + (target - one) / max(two - one, 1)))
            candidates = {r: self.count(method.adapter, {**options, "rank": r})
                          for r in {max(1, guess - 1), guess, guess + 1}}
            options["rank"] = min(candidates, key=lambda r: abs(candidates[r] - target))
        return options, self.count(method.adapter, options)


# ---------------------------------------------------------------- the suite

class StyleSuite:
    """Settings, domains, metric models and the evaluation pipeline (each loaded on first use)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.output_dir)
        self._pipe = self._clip = self._extractor = self._world_clip = None
        self.timings = read_json(self.out / "timings.json", missing_ok=True) or {}

    # -- models
    @property
    def pipe(self):
        if self._pipe is None:
            import torch

            from difftune.model_factory import load_pipeline

            self._pipe = load_pipeline(self.args.pretrained_model_name_or_path, torch_dtype=torch.float32)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @property
    def clip(self):
        if self._clip is None:
            from difftune.metrics.similarity import ClipSimilarity

            self._clip = ClipSimilarity.from_pretrained(self.args.clip_model)
        return self._clip

    @property
    def extractor(self):
        if self._extractor is None:
            from difftune.metrics.fid import load_feature_extractor

            self._extractor = load_feature_extractor(f"clip:{self.args.clip_model}")
        return self._extractor

    @property
    def world_clip(self):
        if self._world_clip is None:
            from difftune.world.clip_model import load_world_clip

            self._world_clip = load_world_clip(self.args.clip_model)
        return self._world_clip

    def record_failure(self, key: str, error: Exception) -> None:
        """A cell that failed (``failures.json``; the report lists them): the grid goes on without it."""
        failures = read_json(self.out / "failures.json", missing_ok=True) or {}
        failures[key] = str(error).splitlines()[0]
        write_json(self.out / "failures.json", failures)
        print(f"style benchmark: {key} failed, the grid goes on: {failures[key]}", file=sys.stderr)

    def record_time(self, key: str, wall: float, cpu: float | None) -> None:
        record_time(self.timings, self.out / "timings.json", key, wall, cpu)

    # -- data
    def train_dir(self, style: str) -> Path:
        from difftune.world.styles import style_dataset

        return style_dataset(style, "train", self.args.data_dir, self.args.train_images, progress=False)

    def heldout(self, style: str) -> tuple[Any, list[str]]:
        """The held-out images and captions: test captions first, then validation captions."""
        from difftune.world.styles import render_part

        count = self.args.test_captions + self.args.validation_captions
        return render_part(style, "heldout", count)

    def plain_scenes(self) -> list:
        from difftune.world.clip_model import single_object_scenes

        return single_object_scenes("heldout_a", self.args.plain_captions)

    def features(self, images) -> Any:
        """World-CLIP FID features of images in [-1, 1] (N, 3, H, W) or uint8 (N, H, W, 3)."""
        import numpy as np
        import torch

        from difftune.metrics.features import extract_features

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        else:
            images = ((images + 1) / 2).clamp(0, 1)
        return extract_features(self.extractor, images, 100)

    def reference(self, key: str, make) -> Any:
        """Real features cached under ``cache/<key>.pt`` (domain images, world scenes)."""
        import torch

        path = self.out / "cache" / f"{key}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        features = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(features, path)
        return features

    def heldout_features(self, style: str):
        return self.reference(f"{style}_heldout", lambda: self.features(
            self.heldout(style)[0][:self.args.test_captions]))

    def train_features(self, style: str):
        from difftune.world.styles import render_part

        return self.reference(f"{style}_train", lambda: self.features(
            render_part(style, "train", self.args.train_images)[0]))

    def world_features(self):
        import numpy as np

        from difftune.world.scenes import render_scene, world_scene

        return self.reference("world_heldout_b", lambda: self.features(np.stack(
            [render_scene(world_scene("heldout_b", i)) for i in range(self.args.world_images)])))

    # -- drawing and scoring
    def draw(self, captions: list[str], seed: int = 0):
        from difftune.world.quality import SamplingSettings, generate

        args = self.args
        settings = SamplingSettings(steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                    seed=seed, batch_size=args.generation_batch)
        return generate(self.pipe, captions, settings)

    def base_plain(self) -> dict[str, Any]:
        """The base model's plain-caption images as world-CLIP embeddings: drift's reference, drawn once."""
        import torch

        path = self.out / "cache" / "base_plain.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        images = self.draw([scene.caption() for scene in self.plain_scenes()], seed=PLAIN_SEED)
        result = {"embeddings": self.clip.image_embeddings(((images + 1) / 2).clamp(0, 1))}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, path)
        return result

    def score(self, adapter: Path | None, style: str, path: Path, validation: bool = False) -> dict[str, Any]:
        """One checkpoint (None: the base model) on one domain; cached in ``path`` (+ its features)."""
        import torch

        import difftune
        from difftune.metrics.fid import frechet_distance
        from difftune.metrics.similarity import paired_cosine
        from difftune.world.clip_model import classify_color_shape
        from difftune.world.styles import caption_prefix

        cached = read_json(path, missing_ok=True)
        if cached is not None:
            return cached
        started, cpu_started = time.perf_counter(), time.process_time()
        _, captions = self.heldout(style)
        test = self.args.test_captions
        captions = captions[test:] if validation else captions[:test]
        if adapter is not None:
            difftune.load_adapter(self.pipe, adapter)
        try:
            styled = self.draw(captions)
            plain_scenes = [] if validation else self.plain_scenes()
            plain = self.draw([s.caption() for s in plain_scenes], seed=PLAIN_SEED) if plain_scenes else None
        finally:
            if adapter is not None:
                difftune.remove_adapter(self.pipe)
        styled_features = self.features(styled)
        result: dict[str, Any] = {"fid_heldout": frechet_distance(self.heldout_features(style),
                                                                  styled_features)}
        features = {"styled": styled_features}
        if not validation:
            prefix = caption_prefix(style)
            texts = [c.removeprefix(prefix) for c in captions]
            embeddings = self.clip.image_embeddings(((styled + 1) / 2).clamp(0, 1))
            result["clip"] = (100 * paired_cosine(embeddings, self.clip.text_embeddings(texts))).tolist()
            result["fid_train"] = frechet_distance(self.train_features(style), styled_features)
            model, tokenizer = self.world_clip
            size = model.config.vision_config.image_size  # the world CLIP's own: the images' size
            pixels = plain if plain.shape[-1] == size else torch.nn.functional.interpolate(
                plain, size=(size, size), mode="bilinear", antialias=True)
            predictions = classify_color_shape(model, tokenizer, pixels)
            truth = [(s.objects[0].color, s.objects[0].shape) for s in plain_scenes]
            result["color"] = [float(p[0] == t[0]) for p, t in zip(predictions, truth, strict=True)]
            result["shape"] = [float(p[1] == t[1]) for p, t in zip(predictions, truth, strict=True)]
            features["plain"] = self.features(plain)
            result["fid_world"] = frechet_distance(self.world_features(), features["plain"])
            plain_embeddings = self.clip.image_embeddings(((plain + 1) / 2).clamp(0, 1))
            result["drift"] = (1 - paired_cosine(plain_embeddings, self.base_plain()["embeddings"])).tolist()
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.record_time(f"score/{path.relative_to(self.out)}", time.perf_counter() - started,
                         time.process_time() - cpu_started)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(features, path.with_suffix(".pt"))
        write_json(path, result)
        return result

    # -- training
    def train(self, row: Row, options: dict[str, Any], style: str, seed: int, rate: float, run_dir: Path,
              steps: int, checkpointing_steps: int) -> dict[str, Any]:
        args = self.args
        command = [sys.executable, "-m", TRAINER_MODULE, "--pretrained_model_name_or_path",
                   args.pretrained_model_name_or_path, "--train_data_dir", str(self.train_dir(style)),
                   "--output_dir", str(run_dir), "--adapter", row.method.adapter,
                   *option_flags(row.method.adapter, options), "--learning_rate", str(rate),
                   "--max_train_steps", str(steps), "--train_batch_size", str(args.train_batch_size),
                   "--checkpointing_steps", str(checkpointing_steps), "--lr_scheduler", "cosine",
                   "--seed", str(seed), "--mixed_precision", "no", "--report_to", "none",
                   "--skip_final_inference", "--resume_from_checkpoint", "latest"]
        check_cell_rate(run_dir, rate)
        fresh = not (run_dir / "train_summary.json").is_file()
        if not (run_dir / CELL_FILE).is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / CELL_FILE, {"learning_rate": rate})
        summary = run_trainer(command, run_dir, f"{row.name} {style} seed {seed}", quiet=True)
        if fresh:
            self.record_time(f"train/{run_dir.relative_to(self.out)}", summary["wall_time_s"],
                             summary.get("process_cpu_seconds"))
        return summary

    def checkpoint(self, run_dir: Path, step: int) -> Path:
        folder = run_dir / f"checkpoint-{step}"
        if (folder / ADAPTER_FILE).is_file():
            return folder
        if step == self.args.max_train_steps and (run_dir / ADAPTER_FILE).is_file():
            return run_dir / ADAPTER_FILE
        raise DifftuneError(f"{folder} is missing: the run in {run_dir} kept no checkpoint at step {step}")


PLAIN_SEED = 1_000_000  # plain captions draw from other seeds than the styled ones
CELL_FILE = "suite_cell.json"  # in a run's folder: the learning rate it was trained at


def check_cell_rate(run_dir: Path, rate: float) -> None:
    """A run trained at another rate than the sweep's choice (the grid or the sweep changed since) is
    refused rather than reused: its scores would be a different experiment's."""
    recorded = read_json(run_dir / CELL_FILE, missing_ok=True)
    if recorded is not None and not math.isclose(recorded["learning_rate"], rate):
        raise DifftuneError(f"{run_dir} was trained at learning rate {recorded['learning_rate']:g} but the "
                            f"sweep now chooses {rate:g}: move that folder and its scores aside to train it "
                            "again")


# ---------------------------------------------------------------- budgets and the sweep

def resolve_budgets(suite: StyleSuite, rows: list[Row]) -> dict[str, Any]:
    """Each row's options and trainable count (``budgets.json``; counted once)."""
    path = suite.out / "budgets.json"
    known = read_json(path, missing_ok=True) or {}
    missing = [row for row in rows if row.name not in known]
    if missing:
        counter = BudgetCounter(suite.args.pretrained_model_name_or_path)
        known["denoiser_parameters"] = counter.total
        for row in missing:
            options, count = counter.options_for(row)
            known[row.name] = {"options": options, "trainable_parameters": count,
                               "target": counter.target(row.level) if row.level else None}
        write_json(path, known)
    return known


def rates_of(args: argparse.Namespace, method: str) -> tuple[float, ...]:
    grid = tuple(args.learning_rates[method])
    middle = len(grid) // 2
    return {1: grid[middle:middle + 1], 2: grid[middle - 1:middle + 1], 3: grid}[args.rates]


def sweep_rate(suite: StyleSuite, row: Row, budgets: dict[str, Any], selection: dict[str, Any],
               bar) -> float:
    """The learning rate of the row's method: lowest validation FID on the first domain, at the matched
    budget (see the docstring); swept when first needed and kept in ``sweep/selection.json``. A
    selection made before the edge rule (no ``extended`` entry) is completed: its runs are cached."""
    args = suite.args
    path = suite.out / "sweep" / "selection.json"
    style = args.styles[0]
    method, rates = row.method.name, rates_of(args, row.method.name)
    if method in selection and "extended" in selection[method]:
        if row.level in (None, MATCHED):  # swept by an earlier run: its cells count as done
            bar.update(len(rates))
        return selection[method]["rate"]
    row = Row(row.method, MATCHED if row.method.levels else None)
    tried: list[dict[str, Any]] = []
    attempted: list[float] = []
    extended: list[float] = []
    queue = list(rates) if len(rates) > 1 else []
    while queue:
        rate = queue.pop(0)
        attempted.append(rate)
        run_dir = suite.out / "sweep" / method / f"lr{rate:g}"
        try:
            suite.train(row, budgets[row.name]["options"], style, args.sweep_seed, rate, run_dir,
                        args.max_train_steps, args.max_train_steps)
            score = suite.score(run_dir / ADAPTER_FILE, style, run_dir / "validation.json", validation=True)
            tried.append({"rate": rate, "fid_validation": score["fid_heldout"]})
        except DifftuneError as error:  # e.g. a rate that diverges: the others decide
            suite.record_failure(f"sweep/{method}/lr{rate:g}", error)
        if rate in rates:
            bar.update(1)
        if not queue and tried and len(extended) < args.sweep_extensions:
            beyond = rate_beyond_edge(tried, attempted)
            if beyond is not None:
                extended.append(beyond)
                queue.append(beyond)
    if len(rates) == 1:
        bar.update(1)
    elif not tried:
        raise DifftuneError(f"style benchmark: every learning rate of {method} failed (failures.json)")
    best = min(tried, key=lambda t: t["fid_validation"])["rate"] if tried else rates[0]
    selection[method] = {"rate": best, "tried": tried, "extended": extended, "domain": style}
    write_json(path, selection)
    return best


def rate_beyond_edge(tried: list[dict[str, Any]], attempted: list[float]) -> float | None:
    """A rate past the grid when the best one is the largest (×3, up to 1) or the smallest (÷3) rate
    tried so far; None when it lies inside, or when the rate beyond was already tried (and failed)."""
    best = min(tried, key=lambda t: t["fid_validation"])["rate"]
    if best == max(attempted) and best * 3 <= 1:
        beyond = best * 3
    elif best == min(attempted):
        beyond = best / 3
    else:
        return None
    return None if any(math.isclose(beyond, a) for a in attempted) else beyond


# ---------------------------------------------------------------- the grid

def run_dir_of(suite: StyleSuite, row: Row, style: str, seed: int) -> Path:
    return suite.out / "runs" / style / f"seed{seed}" / row.name


def score_path(suite: StyleSuite, row_name: str, style: str, seed: int, step: int) -> Path:
    return suite.out / "scores" / style / f"seed{seed}" / row_name / f"step{step}.json"


def run_grid(suite: StyleSuite, rows: list[Row], budgets: dict[str, Any], selection: dict[str, Any],
             bar) -> None:
    """Row by row (a partial run holds whole rows over every domain): the base model on each domain,
    then each row's learning rate (`sweep_rate`), training and scores on every domain and seed."""
    args = suite.args
    for style in args.styles:
        suite.score(None, style, score_path(suite, "base", style, 0, 0))
        bar.update(1)
    for row in rows:
        try:
            rate = sweep_rate(suite, row, budgets, selection, bar)
        except DifftuneError as error:
            suite.record_failure(row.name, error)
            continue
        steps = scored_steps(args, row)
        for style in args.styles:
            for seed in args.seeds:
                run_dir = run_dir_of(suite, row, style, seed)
                try:
                    check_cell_rate(run_dir, rate)
                    todo = [s for s in steps if not score_path(suite, row.name, style, seed, s).is_file()]
                    if todo:
                        suite.train(row, budgets[row.name]["options"], style, seed, rate, run_dir,
                                    args.max_train_steps, math.gcd(*args.checkpoint_steps))
                    for step in steps:
                        path = score_path(suite, row.name, style, seed, step)
                        if not path.is_file():
                            suite.score(suite.checkpoint(run_dir, step), style, path)
                        bar.update(1)
                except DifftuneError as error:  # one failed cell must not stop a night's grid
                    suite.record_failure(f"{row.name}/{style}/seed{seed}", error)


# ---------------------------------------------------------------- the report

def cells(suite: StyleSuite, row_name: str, step: int) -> list[tuple[str, int, dict[str, Any], Path]]:
    """The scored (style, seed) cells of a row at a step, with their results and feature files."""
    args, found = suite.args, []
    for style in args.styles:
        for seed in ([0] if row_name == "base" else args.seeds):
            path = score_path(suite, row_name, style, seed, 0 if row_name == "base" else step)
            result = read_json(path, missing_ok=True)
            if result is not None:
                found.append((style, seed, result, path.with_suffix(".pt")))
    return found


def aggregate(suite: StyleSuite, row_name: str, step: int, baseline: str | None) -> dict[str, Any] | None:
    """Means with intervals of every metric, and paired differences to ``baseline`` where both exist."""
    import numpy as np

    from difftune.metrics.bootstrap import bootstrap_grouped, bootstrap_mean
    from difftune.metrics.fid import FidReference

    mine = cells(suite, row_name, step)
    if not mine:
        return None
    theirs = cells(suite, baseline, step) if baseline else []
    resamples = suite.args.resamples
    out: dict[str, Any] = {"row": row_name, "step": step, "cells": len(mine)}
    for metric in METRICS:
        if metric not in mine[0][2]:
            continue
        if metric in SET_METRICS:
            references = {style: FidReference(reference_features(suite, metric, style)) for style, *_ in mine}
            mine_sets = [(style, load_features(p, metric)) for style, _, _, p in mine]
            out[metric] = bootstrap_grouped([fid_of(references[s], f) for s, f in mine_sets],
                                            [len(f) for _, f in mine_sets],
                                            resamples=fid_resamples(suite.args)).to_dict()
        else:
            table = np.array([r[metric] for _, _, r, _ in mine])
            out[metric] = bootstrap_mean(table, resamples=resamples).to_dict()
        difference = paired_difference(suite, metric, mine, theirs)
        if difference is not None:
            out[f"{metric}_vs_{BASELINE}"] = difference
    return out


def fid_resamples(args: argparse.Namespace) -> int:
    """Bootstrap replicates of a set statistic: each recomputes FID, so a fifth of ``--resamples``."""
    return max(args.resamples // 5, 50)


def digits_of(metric: str) -> int:
    """Decimals a metric is shown with: accuracies and drift are fractions, the rest are tens."""
    return 3 if metric in ("color", "shape", "drift") else 1


def paired_difference(suite: StyleSuite, metric: str, mine: list, theirs: list) -> dict[str, Any] | None:
    """Mean of (mine − theirs) over the cells both rows scored (same domain, seed, prompts and sampling
    seeds), with its two-stage interval: FID recomputed on the same drawn images of both, the other
    metrics' per-prompt differences averaged. None where the rows share no cell."""
    import numpy as np

    from difftune.metrics.bootstrap import bootstrap_grouped, bootstrap_mean
    from difftune.metrics.fid import FidReference

    by_cell = {(s, k): (r, p) for s, k, r, p in theirs}
    paired = [(s, k, r, p) for s, k, r, p in mine if (s, k) in by_cell and metric in r]
    if not paired:
        return None
    if metric in SET_METRICS:
        references = {s: FidReference(reference_features(suite, metric, s)) for s, *_ in paired}
        pairs = [(references[s], load_features(p, metric), load_features(by_cell[(s, k)][1], metric))
                 for s, k, _, p in paired]
        return bootstrap_grouped([fid_difference(reference, a, b) for reference, a, b in pairs],
                                 [len(a) for _, a, _ in pairs],
                                 resamples=fid_resamples(suite.args)).to_dict()
    ours = np.array([r[metric] for _, _, r, _ in paired])
    base = np.array([by_cell[(s, k)][0][metric] for s, k, _, _ in paired])
    return bootstrap_mean(ours - base, resamples=suite.args.resamples).to_dict()


# The README's questions: which row leads each of these, and SaRA against these rows (at the matched
# budget, the last checkpoint).
CONTEST_METRICS = ("fid_heldout", "fid_train", "clip", "color", "shape", "drift")
SARA = "sara"
SARA_AGAINST = ("lora", "full_ft", "supertuning", "dora")


def comparisons(suite: StyleSuite, group: list[dict[str, Any]], step: int,
                ablations: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """Who leads each metric in ``group`` (aggregate rows at one step) and which rows the data cannot
    tell from the leader (the paired difference's 95 % interval holds zero); and SaRA's paired
    differences to LoRA, full fine-tuning, Super-Tuning and DoRA, then the ``ablations`` rows' pairs
    (ABLATION_PAIRS)."""
    scored = {r["row"]: cells(suite, r["row"], step) for r in [*group, *ablations]}
    leaders: dict[str, Any] = {}
    for metric in CONTEST_METRICS:
        means = {r["row"]: r[metric]["mean"] for r in group if metric in r}
        if len(means) < 2:
            continue
        higher_is_better = METRICS[metric][1]
        best = (max if higher_is_better else min)(means, key=means.get)
        versus = {row: paired_difference(suite, metric, scored[row], scored[best])
                  for row in means if row != best}
        versus = {row: d for row, d in versus.items() if d is not None}
        leaders[metric] = {"best": best, "higher_is_better": higher_is_better, "vs_best": versus,
                           "not_told_apart": sorted(row for row, d in versus.items()
                                                    if d["low"] <= 0 <= d["high"])}
    methods = {r.get("method"): r for r in group}
    methods.update({r["method"]: r for r in ablations})
    sara_pairs: dict[str, Any] = {}
    for ours, other in [*((SARA, other) for other in SARA_AGAINST), *ABLATION_PAIRS]:
        if ours not in methods or other not in methods:
            continue
        first, second = methods[ours]["row"], methods[other]["row"]
        if other == BASELINE:  # the aggregate row holds these already
            differences = {metric: methods[ours].get(f"{metric}_vs_{BASELINE}") for metric in CONTEST_METRICS}
        else:
            differences = {metric: paired_difference(suite, metric, scored[first], scored[second])
                           for metric in CONTEST_METRICS}
        sara_pairs[f"{first} − {second}"] = {metric: d for metric, d in differences.items() if d}
    return {"step": step, "group": [r["row"] for r in group], "leaders": leaders, "sara_vs": sara_pairs}


def load_features(path: Path, metric: str):
    import torch

    return torch.load(path, weights_only=True)[SET_METRICS[metric]]


def fid_of(reference, features):
    """FID of the images at the drawn indices against the reference (for `bootstrap_grouped`)."""
    import torch

    return lambda indices: reference.distance(features[torch.as_tensor(indices)])


def fid_difference(reference, features, baseline):
    """The paired FID difference on the same drawn prompts."""
    ours, theirs = fid_of(reference, features), fid_of(reference, baseline)
    return lambda indices: ours(indices) - theirs(indices)


def reference_features(suite: StyleSuite, metric: str, style: str):
    if metric == "fid_heldout":
        return suite.heldout_features(style)
    if metric == "fid_train":
        return suite.train_features(style)
    return suite.world_features()


def write_report(suite: StyleSuite, rows: list[Row], budgets: dict[str, Any], selection: dict[str, Any]
                 ) -> dict[str, Any]:
    from difftune.metrics.vlhi import vlhi

    args = suite.args
    steps = args.checkpoint_steps
    table_rows = [{"row": "base", "step": 0, **(aggregate(suite, "base", 0, None) or {})}]
    run_rows = [cell_row("base", style, seed, 0, cell) for style, seed, cell, _ in cells(suite, "base", 0)]
    for row in rows:
        for step in steps:
            baseline = None if row.name == row.baseline else row.baseline
            result = aggregate(suite, row.name, step, baseline)
            if result is None:
                continue
            result.update({"method": row.method.name, "level": row.level,
                           "trainable_parameters": budgets.get(row.name, {}).get("trainable_parameters"),
                           "learning_rate": selection.get(row.method.name, {}).get("rate")})
            table_rows.append(result)
            run_rows += [cell_row(row.name, style, seed, step, cell)
                         for style, seed, cell, _ in cells(suite, row.name, step)]
    last = [r for r in table_rows if r["step"] == steps[-1] and "fid_heldout" in r
            and (r.get("level") in (MATCHED, None))]
    ablations = [r for r in last if METHODS_BY_NAME[r["method"]] in SARA_ABLATIONS]
    last = [r for r in last if r not in ablations]  # VLHI's group and the leaders: the methods themselves
    group = [r["row"] for r in last]
    for key, fid_metric in (("vlhi", "fid_heldout"), ("vlhi_train", "fid_train")):
        values = vlhi({r["row"]: r[fid_metric]["mean"] for r in last},
                      {r["row"]: r["clip"]["mean"] for r in last})
        for r in last:
            r[key] = values[r["row"]]
    contest = comparisons(suite, last, steps[-1], ablations)
    report = {
        "settings": {
            **{k: portable_path(v) for k, v in vars(args).items()
               if k not in ("output_dir", "data_dir", "report_dir", "report_only", "merge_from")},
            "vlhi_group": group, "baseline": BASELINE,
            "levels": {k: v / SD15_UNET_WEIGHTS for k, v in LEVELS.items()},
            "budgets": budgets, "learning_rates": selection, "machine": machine_description(),
            "timings_seconds": {f"{kind}{clock}": round(sum(v[clock] or 0 for k, v in suite.timings.items()
                                                            if k.startswith(f"{kind}/")), 1)
                                for kind in ("train", "score") for clock in ("wall", "cpu")},
            "drift": "1 − cosine of world-CLIP image embeddings, same caption and seed as the base model",
            "clip_score": "100 · cosine of world-CLIP image and caption embeddings (the caption without "
                          "its style prefix)",
            "fid": "world-CLIP image features, float64 statistics; intervals resample domains × seeds, "
                   "then images",
        },
        "aggregates": table_rows,
        "comparisons": contest,
        "rows": run_rows,
        "failures": read_json(suite.out / "failures.json", missing_ok=True) or {},
    }
    write_json(suite.out / RESULT_FILE, report)
    table = markdown_table(report)
    contest_text = comparisons_tables(report)
    if contest_text:
        table += "\n\n" + contest_text
    (suite.out / "style_benchmark.md").write_text(table + "\n")
    plots = make_plots(report)
    for name, image in plots.items():
        image.save(suite.out / name)
    if args.report_dir:
        write_json(args.report_dir / "results" / "style_benchmark_embedded.json", report)
        for name, image in plots.items():
            (args.report_dir / "images").mkdir(parents=True, exist_ok=True)
            image.save(args.report_dir / "images" / f"style_benchmark_embedded_{name}")
    print(table)
    return report


def cell_row(row: str, style: str, seed: int, step: int, cell: dict[str, Any]) -> dict[str, Any]:
    """One scored cell as a row of the report: each metric's value (a per-prompt list: its mean)."""
    return {"row": row, "style": style, "seed": seed, "step": step,
            **{m: (float(sum(v) / len(v)) if isinstance(v, list) else v)
               for m, v in cell.items() if m in METRICS}}


def _cell(entry: dict[str, Any] | None, digits: int = 1) -> str:
    if not entry:
        return "–"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def markdown_table(report: dict[str, Any]) -> str:
    steps = report["settings"]["checkpoint_steps"]
    lines = ["| method | params | step | " + " | ".join(h for h, _ in METRICS.values()) + " | VLHI | "
             "Δ FID vs LoRA | paper FID / CLIP / VLHI (SD 1.5, 50M) |",
             "|" + "---|" * (len(METRICS) + 6)]
    for r in report["aggregates"]:
        if r["row"] != "base" and r["step"] != steps[-1]:
            continue
        values = " | ".join(_cell(r.get(m), digits_of(m)) for m in METRICS)
        paper = PAPER.get(r.get("method")) if r.get("level") in ("50M", None) else None
        index = "" if r.get("vlhi") is None else f"{r['vlhi']:.2f}"
        paper_text = " / ".join(map(str, paper)) if paper else ""
        lines.append(f"| {r['row']} | {r.get('trainable_parameters') or ''} | {r['step']} | {values} | "
                     f"{index} | {_cell(r.get('fid_heldout_vs_lora'))} | {paper_text} |")
    return "\n".join(lines)


def comparisons_tables(report: dict[str, Any]) -> str:
    """The leaders of each metric with the rows not told apart from them, and SaRA's paired
    differences, as markdown (empty before two rows of the group are scored)."""
    contest = report.get("comparisons") or {}
    leaders, sara = contest.get("leaders") or {}, contest.get("sara_vs") or {}
    if not leaders:
        return ""
    means = {r["row"]: r for r in report["aggregates"] if r["step"] == contest["step"]}
    lines = [f"Who leads, at step {contest['step']} among {', '.join(contest['group'])} (paired differences "
             "on the same domains, prompts and seeds; 95 % intervals):", "",
             "| metric | leader | not told apart from the leader | next row − leader |", "|---|---|---|---|"]
    for metric, entry in leaders.items():
        heading = METRICS[metric][0]
        digits = digits_of(metric)
        best = entry["best"]
        versus = entry["vs_best"]
        runner = min(versus, key=lambda row: abs(versus[row]["mean"])) if versus else None
        runner_text = f"{runner}: {_cell(versus[runner], digits)}" if runner else "–"
        lines.append(f"| {heading} | {best} ({means[best][metric]['mean']:.{digits}f}) | "
                     f"{', '.join(entry['not_told_apart']) or 'none'} | {runner_text} |")
    if sara:
        metrics = list(CONTEST_METRICS)
        lines += ["", "| SaRA − row | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
                  "|" + "---|" * (len(metrics) + 1)]
        for pair, differences in sara.items():
            cells_text = " | ".join(_cell(differences.get(m), digits_of(m)) for m in metrics)
            lines.append(f"| {pair} | {cells_text} |")
    return "\n".join(lines)


def make_plots(report: dict[str, Any]) -> dict[str, Any]:
    from difftune.metrics.reporting import scatter_plot

    trained = [r for r in report["aggregates"] if r["row"] != "base" and "fid_heldout" in r]
    colors = {r["row"]: METHOD_COLORS.get(r.get("method"), None) for r in trained}
    colors = {k: v for k, v in colors.items() if v}
    curves = [(r["drift"]["mean"], r["fid_heldout"]["mean"], r["row"]) for r in trained if "drift" in r]
    final = [r for r in trained if r["step"] == report["settings"]["checkpoint_steps"][-1]]
    by_params = sorted(((r["trainable_parameters"], r["fid_heldout"]["mean"], r["method"]) for r in final
                        if r.get("trainable_parameters")), key=lambda p: (p[2], p[0]))
    return {
        "fid_vs_drift.png": scatter_plot(curves, "drift from the base model (1 − cos) ↓",
                                         "FID to the held-out domain ↓",
                                         "FID against forgetting over checkpoints", colors=colors,
                                         connect=True),
        "fid_vs_params.png": scatter_plot(by_params, "trainable parameters", "FID to the held-out domain ↓",
                                          "FID against trainable parameters (last checkpoint)", log_x=True,
                                          colors=METHOD_COLORS, connect=True),
    }


# ---------------------------------------------------------------- several folders, one grid

MERGED_FILES = ("budgets.json", "timings.json", "failures.json", "sweep/selection.json")


def merge_grid(target: Path, source: Path) -> dict[str, int]:
    """Copy ``source``'s cells (runs, scores, sweep runs) into ``target`` where ``target`` lacks them, and
    merge the bookkeeping: learning rates, timings, failures (a failure that a copied cell has since
    answered is dropped). Refused, before anything is copied, when the two folders are not one grid:
    a row budgeted differently, a method swept to a different rate, a cached reference that differs."""
    import filecmp

    if not (source / "budgets.json").is_file():
        raise DifftuneError(f"--merge_from {source}: no budgets.json there: not a style benchmark folder")
    theirs = {name: read_json(source / name, missing_ok=True) or {} for name in MERGED_FILES}
    ours = {name: read_json(target / name, missing_ok=True) or {} for name in MERGED_FILES}
    for row, entry in theirs["budgets.json"].items():
        if row in ours["budgets.json"] and ours["budgets.json"][row] != entry:
            raise DifftuneError(f"--merge_from {source}: {row} is budgeted differently there "
                                f"({source / 'budgets.json'} against {target / 'budgets.json'})")
    selection_file = "sweep/selection.json"
    for method, entry in theirs[selection_file].items():
        mine = ours[selection_file].get(method)
        if mine is not None and not math.isclose(mine["rate"], entry["rate"]):
            raise DifftuneError(f"--merge_from {source}: {method} was swept to {entry['rate']:g} there and "
                                f"{mine['rate']:g} here ({selection_file})")
    if (source / "cache").is_dir():
        for cached in sorted((source / "cache").iterdir()):
            here = target / "cache" / cached.name
            if here.is_file() and not filecmp.cmp(cached, here, shallow=False):
                raise DifftuneError(f"--merge_from {source}: {cached} differs from {here}: the folders "
                                    "were run with different data or settings")
    counts = copy_missing_files(source, target, ("runs", "scores", "sweep", "cache"), skip=(selection_file,),
                                cells=("runs/*/seed*/*", "sweep/*/lr*"))  # a run moves whole
    merged = {name: {**theirs[name], **ours[name]} for name in MERGED_FILES}
    merged["failures.json"] = {key: error for key, error in merged["failures.json"].items()
                               if not failure_answered(target, key, merged[selection_file])}
    for name in MERGED_FILES:
        if merged[name] or (target / name).is_file():
            write_json(target / name, merged[name])
    return {**counts, "methods": len(theirs[selection_file]), "timings": len(theirs["timings.json"])}


def failure_answered(folder: Path, key: str, selection: dict[str, Any]) -> bool:
    """Whether a recorded failure has an answer in ``folder`` now: the cell scored, the sweep rate
    scored, the row's method swept."""
    parts = key.split("/")
    if parts[0] == "sweep" and len(parts) == 3:  # sweep/<method>/lr<rate>
        return (folder / key / "validation.json").is_file()
    if len(parts) == 3:  # <row>/<style>/seed<k>
        row, style, seed = parts
        return any((folder / "scores" / style / seed / row).glob("step*.json"))
    return key.split("@")[0] in selection  # <row>: its sweep failed


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for source in args.merge_from:  # before the suite reads the folder's bookkeeping (its timings)
        counts = merge_grid(args.output_dir, source)
        print(f"style benchmark: from {source}: {counts['copied']} files copied, {counts['kept']} kept as "
              f"they were here, {counts['methods']} learning rates, {counts['timings']} timings")
    suite = StyleSuite(args)
    rows = suite_rows(args)
    budgets = read_json(suite.out / "budgets.json", missing_ok=True) or {}
    selection = read_json(suite.out / "sweep" / "selection.json", missing_ok=True) or {}
    if not args.report_only and not args.merge_from:
        budgets = resolve_budgets(suite, rows)
        sweep_cells = sum(len(rates_of(args, r.method.name)) for r in rows if r.level in (None, MATCHED))
        grid_cells = len(args.styles) * (1 + len(args.seeds) * sum(len(scored_steps(args, r)) for r in rows))
        with tqdm(total=sweep_cells + grid_cells, desc="style benchmark", unit="cell") as bar:
            run_grid(suite, rows, budgets, selection, bar)
    return write_report(suite, rows, budgets, selection)
