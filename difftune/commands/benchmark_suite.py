"""The benchmark with power: every method against LoRA on several subjects and seeds, with intervals.

    # the embedded model, offline on this CPU (the committed docs/results/benchmark_embedded.json)
    difftune benchmark --suite --output_dir outputs/benchmark_embedded

    # the same protocol on real subjects (DreamBooth-style folders) and SD 1.5 / SDXL, on a GPU
    difftune benchmark --suite --preset sd15 --subjects_dir my_subjects --output_dir outputs/suite_sd15

    # one grid on two cores (or machines): folder a sweeps the rates (on its first subject) and trains
    # its share of the subjects; once a/sweep/selection.json exists, folder b takes it and trains the
    # rest; when both have finished, one report from the joined folders
    difftune benchmark --suite --output_dir a --subjects crescent diamond heart
    mkdir -p b/sweep && cp a/sweep/selection.json b/sweep/
    difftune benchmark --suite --output_dir b --subjects ring star
    difftune benchmark --suite --output_dir a --merge_from b

The protocol is the same for every method (the numbers of each preset are in SUITE_PRESETS):

1. **Learning-rate sweep.** Each method trains on the first subject at every rate of its grid
   (seed ``sweep_seed``, not one of the test seeds) and draws the *validation* prompts, a list
   disjoint from the test prompts. It keeps the rate with the highest CLIP-I among those whose
   class CLIP-T stays at ≥ ``sweep_class_floor`` of the base model's; if none does, the rate
   with the highest class CLIP-T. Cached in ``sweep/selection.json``.
2. **The grid.** Every method × subject × seed trains at its rate with prior preservation and
   saves checkpoints; at each checkpoint the model draws the test prompts and the same prompts
   without the identifier (its class images, same seeds), scored by ``difftune.metrics.subject``.
   Both lists share the pipeline calls and the adapter is merged into the weights while it draws
   (the same images to float rounding, less arithmetic per call); the base model draws once per
   subject.
   The class images' FID is taken against real images of the class: world scenes holding the
   class object for the embedded model, the base model's class images for real models.
3. **The report.** Per method and checkpoint the mean with a 95 % two-stage bootstrap interval
   (subjects, then prompts; ``difftune.metrics.bootstrap``) and the paired difference to LoRA
   with its interval; curves of subject fidelity against class preservation over checkpoints.

Methods: LoRA (rank 16, every layer), SaRA at LoRA's trainable-parameter count, SaRA at its
default threshold, SVFit and TLoRA (their defaults). Everything lives on disk and resumes:
a trained run is not retrained (an interrupted one continues from its last checkpoint) and a
scored checkpoint is not rescored. ``--report_only`` writes the report from what exists;
``--merge_from`` joins folders that each ran a share of one grid and writes the report.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from difftune.errors import DifftuneError
from difftune.io import read_json
from difftune.machine import machine_description
from difftune.metrics import cli as metrics_cli
from difftune.metrics.subject import (
    ASSETS_DIR,
    PROMPT_LISTS,
    VALIDATION_PROMPT_LISTS,
    EvalRun,
    Subject,
    evaluate_runs,
    load_images,
    run_prompts,
)
from difftune.paths import portable_path
from difftune.training.data import SUBJECT_FILE

from .benchmark_runs import ADAPTER_FILE, METHOD_COLORS, copy_missing_files, record_time, train_method

BASELINE = "lora"
METRICS = ("clip_i", "clip_t", "pres_clip_i", "class_clip_t")
METRIC_NAMES = {
    "clip_i": "CLIP-I ↑",
    "clip_t": "CLIP-T ↑",
    "pres_clip_i": "PRES-CLIP-I ↓",
    "class_clip_t": "class CLIP-T ↑",
    "class_fid": "class FID ↓",
    "pres": "PRES ↓",
    "dino": "DINO ↑",
}
HIGHER_IS_BETTER = {
    "clip_i": True,
    "clip_t": True,
    "pres_clip_i": False,
    "pres": False,
    "class_clip_t": True,
    "class_fid": False,
    "dino": True,
}
RESULT_FILE = "benchmark_suite.json"


@dataclass(frozen=True)
class SuiteMethod:
    """A row of the suite: the trainer's adapter and flags, and its learning-rate grid key."""

    name: str
    adapter: str
    flags: tuple[str, ...] = ()
    matched_to_baseline: bool = False  # trains as many parameters as the baseline (SaRA's --sara_budget)


SUITE_METHODS = (
    SuiteMethod("lora", "lora", ("--targets", "all", "--rank", "16")),
    SuiteMethod("sara_matched", "sara", matched_to_baseline=True),
    SuiteMethod("sara", "sara"),
    SuiteMethod("svfit", "svfit"),
    SuiteMethod("tlora", "tlora"),
)

# Rates around each method's measured recipe (difftune/training/recipes.py) for the embedded
# model; a tenth of them for SD 1.5 and SDXL (LoRA's grid then brackets diffusers' 1e-4).
_EMBEDDED_RATES = {
    "lora": (3e-4, 1e-3, 3e-3),
    "sara_matched": (1e-3, 3e-3, 1e-2),
    "sara": (1e-3, 3e-3, 1e-2),
    "svfit": (1e-3, 3e-3, 1e-2),
    "tlora": (3e-4, 1e-3, 3e-3),
}
_REAL_RATES = {method: tuple(rate / 10 for rate in rates) for method, rates in _EMBEDDED_RATES.items()}

SUITE_PRESETS: dict[str, dict[str, Any]] = {
    # Sized for the 2-core CPU: 10 sampler steps (DPM-Solver++) keep 45 000 images affordable.
    "embedded": {
        "pretrained_model_name_or_path": "builtin:embedded",
        "subjects_dir": ASSETS_DIR / "subjects",
        "seeds": [0, 1, 2],
        "max_train_steps": 600,
        "checkpoint_steps": [200, 400, 600],
        "train_batch_size": 1,
        "mixed_precision": "no",
        "prior_loss_weight": 0.3,
        "num_class_images": 50,
        "prompts": "world",
        "num_prompts": 25,
        "images_per_prompt": 4,
        "validation_images_per_prompt": 2,
        "num_inference_steps": 10,
        "guidance_scale": 5.0,
        "learning_rates": _EMBEDDED_RATES,
        "class_reference": "world",
    },
    "sd15": {
        "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "subjects_dir": None,
        "seeds": [0, 1, 2],
        "max_train_steps": 800,
        "checkpoint_steps": [400, 600, 800],
        "train_batch_size": 1,
        "resolution": 512,
        "mixed_precision": "fp16",
        "prior_loss_weight": 1.0,
        "num_class_images": 200,
        "prompts": "dreambooth",
        "num_prompts": 25,
        "images_per_prompt": 4,
        "validation_images_per_prompt": 2,
        "num_inference_steps": 25,
        "guidance_scale": 7.5,
        "learning_rates": _REAL_RATES,
        "class_reference": "base",
        "clip_model": metrics_cli.HUB_CLIP,
        "dino_model": metrics_cli.HUB_DINO,
    },
}
# SDXL: the SD 1.5 protocol at its own size and guidance.
SUITE_PRESETS["sdxl"] = {
    **SUITE_PRESETS["sd15"],
    "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
    "resolution": 1024,
    "guidance_scale": 5.0,
}


# ---------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftune benchmark --suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(SUITE_PRESETS),
        default="embedded",
        help="defaults for everything below: 'embedded' (CPU, offline), 'sd15' or 'sdxl' (GPU)",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument(
        "--report_only", action="store_true", help="write the report from what exists; train nothing"
    )
    parser.add_argument(
        "--merge_from",
        type=Path,
        nargs="+",
        default=[],
        help="folders of the same grid run elsewhere (e.g. one process per core, split by --subjects or "
        "--seeds): their runs and scores are copied in where this folder lacks them, then the report is "
        "written from the merged folder (trains nothing)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[m.name for m in SUITE_METHODS],
        choices=[m.name for m in SUITE_METHODS],
        help="rows of the suite (lora is the baseline)",
    )
    parser.add_argument(
        "--subjects_dir",
        type=Path,
        help="a folder of subject folders (images, optional subject.json with identifier, "
        "class_name, instance_prompt, class_prompt)",
    )
    parser.add_argument("--subjects", nargs="+", default=None, help="only these subject folders (by name)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds of the grid")
    parser.add_argument(
        "--sweep_seed", type=int, default=100, help="training seed of the learning-rate sweep"
    )
    parser.add_argument(
        "--sweep_class_floor",
        type=float,
        default=0.9,
        help="a swept rate must keep class CLIP-T at this fraction of the base model's",
    )
    parser.add_argument(
        "--sweep_extensions",
        type=int,
        default=2,
        help="rates tried past an edge of a method's grid when the edge rate wins (x3 up, /3 down)",
    )
    parser.add_argument(
        "--learning_rates",
        action="append",
        default=[],
        metavar="METHOD=R1,R2,...",
        help="one method's sweep grid, replacing the preset's (repeatable); one rate: no sweep",
    )
    parser.add_argument("--train_args", default="", help="extra trainer flags for every run")
    group = parser.add_argument_group("training (the same for every method)")
    group.add_argument("--pretrained_model_name_or_path")
    group.add_argument("--max_train_steps", type=int)
    group.add_argument(
        "--checkpoint_steps", nargs="+", type=int, help="steps scored (the last = max_train_steps)"
    )
    group.add_argument("--train_batch_size", type=int)
    group.add_argument("--resolution", type=int, default=None)
    group.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"))
    group.add_argument("--prior_loss_weight", type=float)
    group.add_argument("--num_class_images", type=int)
    group.add_argument("--validation_images_per_prompt", type=int)
    group.add_argument(
        "--class_reference",
        choices=("world", "base"),
        help="FID reference of class images: real world scenes of the class, or the base model's",
    )
    metrics_cli.add_evaluation_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    defaults = dict(SUITE_PRESETS[preset])
    rates = dict(defaults.pop("learning_rates"))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.fid = True
    if args.subjects_dir is None:
        parser.error(f"--subjects_dir is required with --preset {preset} (a folder of subject folders)")
    if sorted(args.checkpoint_steps)[-1] != args.max_train_steps or min(args.checkpoint_steps) <= 0:
        parser.error(
            f"--checkpoint_steps {args.checkpoint_steps}: positive, the last one = --max_train_steps "
            f"({args.max_train_steps})"
        )
    args.checkpoint_steps = sorted(set(args.checkpoint_steps))
    args.checkpointing_steps = math.gcd(*args.checkpoint_steps)
    for spec in args.learning_rates:
        method, sep, values = spec.partition("=")
        try:
            grid = tuple(float(v) for v in values.split(","))
        except ValueError:
            grid = ()
        if not sep or method not in rates or not grid or not all(0 < r <= 1 for r in grid):
            parser.error(
                f"--learning_rates {spec!r}: expected METHOD=R1,R2 with METHOD one of "
                f"{', '.join(rates)} and rates in (0, 1]"
            )
        rates[method] = grid
    args.rate_grids = rates
    if BASELINE not in args.methods:
        parser.error(f"--methods must include the baseline {BASELINE}")
    args.methods = [m for m in SUITE_METHODS if m.name in args.methods]
    return args


# ---------------------------------------------------------------- subjects and the world's class images


@dataclass
class SuiteSubject:
    """A subject and its prompts: from ``subject.json`` where it gives them."""

    subject: Subject
    instance_prompt: str
    class_prompt: str
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.subject.name


def load_subjects(args: argparse.Namespace) -> list[SuiteSubject]:
    root = Path(args.subjects_dir)
    if not root.is_dir():
        raise DifftuneError(f"--subjects_dir {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if args.subjects:
        missing = [s for s in args.subjects if not (root / s).is_dir()]
        if missing:
            raise DifftuneError(f"--subjects: no folder {root / missing[0]}")
        folders = [root / s for s in args.subjects]
    if not folders:
        raise DifftuneError(f"--subjects_dir {root} holds no subject folders")
    subjects = []
    for folder in folders:
        subject = Subject.from_dir(folder)
        meta_file = folder / SUBJECT_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        subjects.append(
            SuiteSubject(
                subject,
                meta.get("instance_prompt") or f"a {subject.identifier} {subject.class_name}",
                meta.get("class_prompt") or f"a {subject.class_name}",
                meta,
            )
        )
    return subjects


def world_class_images(subject: SuiteSubject, count: int, split: str) -> list:
    """``count`` real world scenes holding the subject's class object (``class_color``/``class_shape``)."""
    from PIL import Image

    from difftune.world.scenes import render_scene, scenes_with_object

    color, shape = subject.meta.get("class_color"), subject.meta.get("class_shape")
    if not (color and shape):
        raise DifftuneError(
            f"{subject.subject.directory / SUBJECT_FILE}: class_color and class_shape are "
            "needed for --class_reference world"
        )
    return [Image.fromarray(render_scene(scene)) for scene in scenes_with_object(shape, color, count, split)]


# ---------------------------------------------------------------- one run: train, then score its checkpoints


class Suite:
    """The state of one suite: settings, metric models, the evaluation pipeline (loaded once)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.output_dir)
        self.model = args.pretrained_model_name_or_path
        self.test_prompts = PROMPT_LISTS.get(args.prompts, Path(args.prompts))
        self.validation_prompts = VALIDATION_PROMPT_LISTS.get(args.prompts)
        if self.validation_prompts is None:
            raise DifftuneError(
                f"--prompts {args.prompts}: the suite needs a list with a validation twin "
                f"({', '.join(VALIDATION_PROMPT_LISTS)})"
            )
        self.options = metrics_cli.evaluation_options(args)
        self.test_settings = self.options.generation
        validation_images = args.validation_images_per_prompt
        self.validation_settings = replace(self.test_settings, images_per_prompt=validation_images)
        self._pipe = None
        self._scorer = None
        self._class_references: dict[str, tuple[str, list]] = {}  # rendered once per subject
        self.timings = read_json(self.out / "timings.json", missing_ok=True) or {}

    # -- lazily loaded models (a --report_only run loads none)
    @property
    def pipe(self):
        if self._pipe is None:
            device, dtype = metrics_cli.resolve_device(self.options)
            self._pipe = metrics_cli.load_eval_pipeline(self.model, device, dtype)
        return self._pipe

    @property
    def scorer(self):
        if self._scorer is None:
            device, _ = metrics_cli.resolve_device(self.options)
            self._scorer = metrics_cli.build_scorer(self.options, self.model, device)
        return self._scorer

    def record_time(self, key: str, wall: float, cpu: float | None) -> None:
        record_time(self.timings, self.out / "timings.json", key, wall, cpu)

    def total_seconds(self, kind: str, clock: str) -> float | None:
        """Summed ``clock`` ("wall" or "cpu") seconds of every ``kind`` ("train", "score") entry;
        None for CPU when an entry lacks it (folders written before CPU time was recorded held wall
        seconds alone)."""
        values = [entry.get(clock) if isinstance(entry, dict) else (entry if clock == "wall" else None)
                  for key, entry in self.timings.items() if key.startswith(f"{kind}/")]
        return None if any(v is None for v in values) else round(sum(values), 2)

    # -- training
    def train(
        self,
        method: SuiteMethod,
        subject: SuiteSubject,
        seed: int,
        rate: float,
        run_dir: Path,
        budget: int | None,
    ) -> dict[str, Any]:
        args = self.args
        flags = [*method.flags, "--prior_loss_weight", str(args.prior_loss_weight)]
        if budget is not None:
            flags += ["--sara_budget", str(budget)]
        settings = SimpleNamespace(
            pretrained_model_name_or_path=self.model,
            instance_prompt=subject.instance_prompt,
            max_train_steps=args.max_train_steps,
            train_batch_size=args.train_batch_size,
            seed=seed,
            mixed_precision=args.mixed_precision,
            checkpointing_steps=args.checkpointing_steps,
            learning_rate=rate,
            resolution=args.resolution,
            with_prior_preservation=True,
            class_data_dir=self.out / "class_images" / subject.name,
            class_prompt=subject.class_prompt,
            num_class_images=args.num_class_images,
            train_args=args.train_args,
            retrain=False,
            quiet=True,
        )
        fresh = not (run_dir / "train_summary.json").is_file()
        start = time.perf_counter()
        summary = train_method(settings, subject.subject, method.adapter, flags, output_dir=run_dir)
        if fresh:
            self.record_time(f"train/{run_dir.relative_to(self.out)}", time.perf_counter() - start,
                             summary.get("process_cpu_seconds"))
        return summary

    # -- scoring
    def score(
        self, name: str, adapter: Path | None, subject: SuiteSubject, eval_dir: Path, validation: bool = False
    ) -> dict[str, Any]:
        """``evaluate_runs`` on one adapter (None: the base model), with the class images' FID."""
        prompts = self.validation_prompts if validation else self.test_prompts
        settings = self.validation_settings if validation else self.test_settings
        num_prompts = None if validation else self.args.num_prompts
        start, cpu_start = time.perf_counter(), time.process_time()
        result = evaluate_runs(
            self.pipe,
            [EvalRun(name, adapter, subject.subject)],
            prompts,
            settings,
            self.scorer,
            eval_dir,
            self.model,
            num_prompts=num_prompts,
            with_class_prompts=True,
            merge_adapters=True,  # the same model, drawn without the adapter's arithmetic per step
        )[0]
        result_dir = eval_dir / name / subject.name
        if not validation:
            result["class_fid"] = self.class_fid(result_dir, subject)
        if time.perf_counter() - start > 1:
            self.record_time(f"score/{result_dir.relative_to(self.out)}", time.perf_counter() - start,
                             time.process_time() - cpu_start)
        return result

    def class_fid(self, result_dir: Path, subject: SuiteSubject) -> dict[str, Any]:
        """FID of a run's class images against the class reference; cached beside its metrics."""
        from difftune.io import write_json
        from difftune.metrics.features import extract_features
        from difftune.metrics.fid import fid_from_features

        cache = result_dir / "class_fid.json"
        metrics = result_dir / "metrics.json"
        if cache.is_file() and cache.stat().st_mtime_ns >= metrics.stat().st_mtime_ns:
            return json.loads(cache.read_text())
        reference_name, reference = self.class_reference(subject)
        extractor = self.scorer.fid_extractor
        real = self.scorer._reference("fid", reference_name, reference)
        fake = extract_features(
            extractor,
            load_images(result_dir / "class_images", "class images"),
            self.scorer.batch_size,
            "FID class images",
        )
        result = {**fid_from_features(real, fake, extractor).to_dict(), "reference": reference_name}
        write_json(cache, result)
        return result

    def class_reference(self, subject: SuiteSubject) -> tuple[str, list]:
        """(name, images) of the subject's class-FID reference; made once per subject and process (the
        scorer keeps its features by that name)."""
        if subject.name not in self._class_references:
            count = self.args.num_prompts * self.args.images_per_prompt
            if self.args.class_reference == "world":
                reference = (
                    f"world scenes with a {subject.subject.class_name} (heldout_b)",
                    world_class_images(subject, count, "heldout_b"),
                )
            else:
                base_dir = self.base_eval_dir(subject) / "base" / subject.name / "class_images"
                reference = (
                    f"base model class images of {subject.name}",
                    load_images(base_dir, "base class images"),
                )
            self._class_references[subject.name] = reference
        return self._class_references[subject.name]

    def real_vs_real_fid(self, subject: SuiteSubject) -> float | None:
        """The FID floor of the world reference: two disjoint sets of real class scenes."""
        from difftune.metrics.features import extract_features
        from difftune.metrics.fid import fid_from_features

        if self.args.class_reference != "world":
            return None
        count = self.args.num_prompts * self.args.images_per_prompt
        name, reference = self.class_reference(subject)
        real = self.scorer._reference("fid", name, reference)
        other = extract_features(
            self.scorer.fid_extractor,
            world_class_images(subject, count, "heldout_a"),
            self.scorer.batch_size,
            "FID real vs real",
        )
        return fid_from_features(real, other, self.scorer.fid_extractor).fid

    # -- where things live
    def base_eval_dir(self, subject: SuiteSubject) -> Path:
        return self.out / "eval" / subject.name / "base"

    def run_dir(self, method: SuiteMethod, subject: SuiteSubject, seed: int) -> Path:
        return self.out / "runs" / subject.name / f"seed{seed}" / method.name

    def eval_dir(self, subject: SuiteSubject, seed: int, step: int) -> Path:
        return self.out / "eval" / subject.name / f"seed{seed}" / f"step{step}"

    def checkpoint_adapter(self, run_dir: Path, step: int) -> Path:
        adapter = run_dir / f"checkpoint-{step}" / ADAPTER_FILE
        if not adapter.is_file() and step == self.args.max_train_steps:
            adapter = run_dir / ADAPTER_FILE
        if not adapter.is_file():
            raise DifftuneError(
                f"{adapter} is missing: the run in {run_dir} kept no checkpoint at step {step} "
                "(--checkpoints_total_limit in --train_args?)"
            )
        return adapter


# ---------------------------------------------------------------- the sweep


def sweep_score(entry: dict[str, Any], base: dict[str, Any], floor: float) -> tuple[int, float]:
    """Sort key of a swept rate: keeping the class first, then subject fidelity (else class CLIP-T)."""
    keeps_class = entry["class_clip_t"] >= floor * base["class_clip_t"]
    return (1, entry["clip_i"]) if keeps_class else (0, entry["class_clip_t"])


def run_sweep(suite: Suite, subjects: list[SuiteSubject], bar) -> dict[str, Any]:
    """Each method's rate, picked on the first subject's validation prompts (cached)."""
    from difftune.io import write_json

    args = suite.args
    path = suite.out / "sweep" / "selection.json"
    stored = read_json(path, missing_ok=True) or {}
    subject = subjects[0]
    base = None
    selection = dict(stored.get("methods", {}))
    for method in args.methods:
        grid = args.rate_grids[method.name]
        if (
            method.name in selection
            and selection[method.name]["grid"] == list(grid)
            and "extended" in selection[method.name]
        ):
            continue
        if len(grid) == 1:  # one rate given: nothing to sweep
            selection[method.name] = {
                "grid": list(grid),
                "tried": [{"learning_rate": grid[0]}],
                "extended": [],
                "learning_rate": grid[0],
                "trainable_parameters": None,
            }
            continue
        if base is None:
            base = suite.score("base", None, subject, suite.out / "sweep" / "eval_base", validation=True)
        tried: list[dict[str, Any]] = []
        extended: list[float] = []
        queue = list(grid)
        while queue:
            rate = queue.pop(0)
            bar.set_postfix_str(f"sweep {method.name} lr {rate:g}")
            run_dir = suite.out / "sweep" / method.name / f"lr{rate:g}"
            budget = selection_budget(suite, method, selection, subject)
            summary = suite.train(method, subject, args.sweep_seed, rate, run_dir, budget)
            result = suite.score(
                method.name, run_dir / ADAPTER_FILE, subject, run_dir / "eval", validation=True
            )
            tried.append(
                {
                    "learning_rate": rate,
                    "clip_i": result["clip_i"],
                    "class_clip_t": result["class_clip_t"],
                    "trainable_parameters": summary.get("trainable_parameters"),
                }
            )
            if rate in grid:
                bar.update(1)
            if not queue and len(extended) < args.sweep_extensions:
                beyond = rate_beyond_edge(tried, base, args.sweep_class_floor)
                if beyond is not None:
                    extended.append(beyond)
                    queue.append(beyond)
        best = max(tried, key=lambda e: sweep_score(e, base, args.sweep_class_floor))
        selection[method.name] = {
            "grid": list(grid),
            "extended": extended,
            "tried": tried,
            "learning_rate": best["learning_rate"],
            "trainable_parameters": best.get("trainable_parameters"),
        }
        base_scores = {k: base[k] for k in ("clip_i", "class_clip_t")} if base else stored.get("base")
        write_json(
            path,
            {
                "subject": subject.name,
                "seed": args.sweep_seed,
                "rule": sweep_rule(args),
                "base": base_scores,
                "methods": selection,
            },
        )
    return selection


def rate_beyond_edge(tried: list[dict[str, Any]], base: dict[str, Any], floor: float) -> float | None:
    """A rate past the grid when the best one sits on its edge: 3× the largest when that is best and
    keeps the class (the method may still learn more), a third of the smallest when it is best because
    no rate keeps the class. None when the best rate is inside the grid."""
    rates = sorted(t["learning_rate"] for t in tried)
    best = max(tried, key=lambda e: sweep_score(e, base, floor))
    keeps_class = sweep_score(best, base, floor)[0] == 1
    if best["learning_rate"] == rates[-1] and keeps_class and rates[-1] * 3 <= 1:
        return rates[-1] * 3
    if best["learning_rate"] == rates[0] and not keeps_class:
        return rates[0] / 3
    return None


def sweep_rule(args: argparse.Namespace) -> str:
    return (
        f"highest validation CLIP-I among the rates keeping class CLIP-T ≥ {args.sweep_class_floor:g} × the "
        "base model's, else the highest class CLIP-T; a winner on the grid's edge adds up to "
        f"{args.sweep_extensions} rates beyond it (×3 upward, ÷3 downward)"
    )


def selection_budget(
    suite: Suite, method: SuiteMethod, selection: dict[str, Any], subject: SuiteSubject
) -> int | None:
    """SaRA at LoRA's count: the trainable parameters of the baseline's runs (the same for every rate)."""
    if not method.matched_to_baseline:
        return None
    count = (selection.get(BASELINE) or {}).get("trainable_parameters")
    if count is None:
        summaries = sorted((suite.out / "runs").glob(f"*/seed*/{BASELINE}/train_summary.json"))
        count = json.loads(summaries[0].read_text())["trainable_parameters"] if summaries else None
    if count is None:
        raise DifftuneError(
            f"{method.name} needs the trainable count of a {BASELINE} run: sweep or train {BASELINE} first"
        )
    return int(count)


# ---------------------------------------------------------------- the grid


def run_grid(suite: Suite, subjects: list[SuiteSubject], selection: dict[str, Any], bar) -> None:
    args = suite.args
    for subject in subjects:  # the base model's scores, once per subject (its images do not depend on a seed)
        bar.set_postfix_str(f"base {subject.name}")
        suite.score("base", None, subject, suite.base_eval_dir(subject))
    for seed in args.seeds:  # seed outermost: after each seed the report covers every subject and method
        for subject in subjects:
            for method in args.methods:
                bar.set_postfix_str(f"seed {seed} {subject.name} {method.name}")
                run_dir = suite.run_dir(method, subject, seed)
                rate = selection[method.name]["learning_rate"]
                suite.train(
                    method, subject, seed, rate, run_dir, selection_budget(suite, method, selection, subject)
                )
                for step in args.checkpoint_steps:
                    suite.score(
                        method.name,
                        suite.checkpoint_adapter(run_dir, step),
                        subject,
                        suite.eval_dir(subject, seed, step),
                    )
                bar.update(1)


# ---------------------------------------------------------------- the report


def collect_rows(suite: Suite, subjects: list[SuiteSubject]) -> tuple[list[dict], list[dict], list[dict]]:
    """(run rows, per-prompt rows, base rows) from the metrics on disk: only (subject, seed) pairs that
    every method finished at every checkpoint, so every comparison is paired."""
    from difftune.metrics.comparison import benchmark_rows

    args = suite.args

    def read(result_dir: Path) -> dict | None:
        metrics = read_json(result_dir / "metrics.json", missing_ok=True)
        if metrics is not None:
            metrics["class_fid"] = read_json(result_dir / "class_fid.json", missing_ok=True)
        return metrics

    run_rows, prompt_rows, base_rows = [], [], []
    for subject in subjects:
        base = read(suite.base_eval_dir(subject) / "base" / subject.name)
        if base is not None:
            base_rows.append(run_row(base, "base", subject.name, None, 0))
            prompt_rows += benchmark_rows(base, "base", 0, 0)
        for seed in args.seeds:
            found = {
                (m.name, step): read(suite.eval_dir(subject, seed, step) / m.name / subject.name)
                for m in args.methods
                for step in args.checkpoint_steps
            }
            if any(v is None for v in found.values()):
                continue
            for (method, step), metrics in found.items():
                run_rows.append(run_row(metrics, method, subject.name, seed, step))
                prompt_rows += benchmark_rows(metrics, method, seed, step)
    return run_rows, prompt_rows, base_rows


def run_row(
    metrics: dict[str, Any], method: str, subject: str, seed: int | None, step: int
) -> dict[str, Any]:
    fid = metrics.get("class_fid") or {}
    return {
        "method": method,
        "subject": subject,
        "seed": seed,
        "step": step,
        **{k: metrics.get(k) for k in ("clip_i", "clip_t", "pres_clip_i", "class_clip_t", "dino", "pres")},
        "class_fid": fid.get("fid"),
        "adapter": metrics.get("adapter"),
    }


def fid_comparison(
    run_rows: list[dict], methods: list[str], steps: list[int], level: float = 0.95
) -> list[dict[str, Any]]:
    """Class FID per method and step: the mean over subjects (seeds averaged) with an interval resampling
    subjects, and the paired difference to the baseline."""
    import numpy as np

    from difftune.metrics.bootstrap import bootstrap_mean, bootstrap_paired_difference

    def per_subject(method: str, step: int) -> tuple[list[str], np.ndarray]:
        values: dict[str, list[float]] = {}
        for row in run_rows:
            if row["method"] == method and row["step"] == step and row["class_fid"] is not None:
                values.setdefault(row["subject"], []).append(row["class_fid"])
        names = sorted(values)
        return names, np.array([np.mean(values[n]) for n in names])

    results = []
    for method in methods:
        for step in steps:
            names, table = per_subject(method, step)
            if not names:
                continue
            entry = {
                "method": method,
                "step": step,
                "metric": "class_fid",
                "subjects": len(names),
                "mean": bootstrap_mean(table, level).to_dict(),
            }
            if method != BASELINE:
                base_names, base = per_subject(BASELINE, step)
                if base_names == names:
                    difference = bootstrap_paired_difference(table, base, level)
                    entry["difference"] = {**difference.to_dict(), "significant": difference.excludes_zero}
            results.append(entry)
    return results


def significance_sentences(aggregates: list[dict[str, Any]], step: int) -> list[str]:
    """In words, at one checkpoint: which differences to the baseline are significant, and which way."""
    sentences = []
    for entry in aggregates:
        diff = entry.get("difference")
        if entry["step"] != step or diff is None:
            continue
        name = METRIC_NAMES.get(entry["metric"], entry["metric"]).rstrip(" ↑↓")
        interval = f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"
        if diff["significant"]:
            better = (diff["mean"] > 0) == HIGHER_IS_BETTER[entry["metric"]]
            verdict = f"{'better' if better else 'worse'} than {BASELINE} (significant)"
        else:
            verdict = f"not significantly different from {BASELINE}"
        sentences.append(f"- {entry['method']} on {name}: {interval}, {verdict}.")
    return sentences


def _listing(label: str, values: dict[str, str]) -> str:
    """``label: name value, name value.`` for a report line."""
    return f"{label}: " + ", ".join(f"{name} {value}" for name, value in values.items()) + "."


def cpu_minutes(timing: dict[str, float | None]) -> str:
    """The report's CPU-time part, when every entry recorded it."""
    if timing["train_cpu_s"] is None or timing["score_cpu_s"] is None:
        return ""
    return f" ({timing['train_cpu_s'] / 60:.0f} and {timing['score_cpu_s'] / 60:.0f} min of CPU)"


def write_report(suite: Suite, subjects: list[SuiteSubject], selection: dict[str, Any]) -> dict[str, Any]:
    """``benchmark_suite.json`` / ``.md`` and the curves, from what is on disk."""
    import numpy as np

    from difftune.io import save_image, write_json, write_text
    from difftune.metrics.bootstrap import bootstrap_mean
    from difftune.metrics.comparison import cell_table, compare_methods, comparison_markdown
    from difftune.metrics.reporting import markdown_table, scatter_plot

    args = suite.args
    methods = [m.name for m in args.methods]
    run_rows, prompt_rows, base_rows = collect_rows(suite, subjects)
    method_prompt_rows = [r for r in prompt_rows if r["method"] != "base"]
    pairs = sorted({(r["subject"], r["seed"]) for r in run_rows})
    aggregates: list[dict[str, Any]] = []
    if method_prompt_rows:
        aggregates = compare_methods(method_prompt_rows, METRICS, BASELINE)
        aggregates += fid_comparison(run_rows, methods, args.checkpoint_steps)
    base_summary = {}
    if base_rows:
        base_prompts = [r for r in prompt_rows if r["method"] == "base"]
        for metric in METRICS:
            table, _, _ = cell_table(base_prompts, "base", 0, metric)
            base_summary[metric] = bootstrap_mean(table).to_dict()
        fids = [r["class_fid"] for r in base_rows if r["class_fid"] is not None]
        if fids:
            base_summary["class_fid"] = bootstrap_mean(np.array(fids)).to_dict()
    real_vs_real = {}
    if args.report_only:  # loads no model: keeps the floors the last full run measured
        stored = read_json(suite.out / RESULT_FILE, missing_ok=True) or {}
        real_vs_real = stored.get("real_vs_real_class_fid", {})
    elif args.class_reference == "world":
        real_vs_real = {s.name: suite.real_vs_real_fid(s) for s in subjects}

    expected = len(subjects) * len(args.seeds)
    timing = {
        "train_s": suite.total_seconds("train", "wall"),
        "score_s": suite.total_seconds("score", "wall"),
        "train_cpu_s": suite.total_seconds("train", "cpu"),
        "score_cpu_s": suite.total_seconds("score", "cpu"),
    }
    result = {
        "settings": {
            **{
                k: portable_path(v)
                for k, v in vars(args).items()
                if k not in ("methods", "rate_grids", "learning_rates", "output_dir")
            },
            "methods": {
                m.name: {
                    "adapter": m.adapter,
                    "flags": list(m.flags),
                    "matched_to_baseline": m.matched_to_baseline,
                }
                for m in args.methods
            },
            "rate_grids": args.rate_grids,
        },
        "machine": machine_description(),
        "sweep": selection,
        "complete": len(pairs) == expected,
        "subject_seed_pairs": [list(p) for p in pairs],
        "expected_pairs": expected,
        "timing": timing,
        "base": base_summary,
        "real_vs_real_class_fid": real_vs_real,
        "rows": base_rows + run_rows,
        "aggregates": aggregates,
    }
    write_json(suite.out / RESULT_FILE, result)

    final = args.checkpoint_steps[-1]
    lines = [
        f"# Every method against {BASELINE}: {suite.model}",
        "",
        f"{len(pairs)} of {expected} (subject, seed) runs per method finished"
        + ("" if len(pairs) == expected else " (partial: rerun the same command to continue)")
        + "; "
        f"{args.num_prompts} test prompts × {args.images_per_prompt} images and as many class images per "
        f"checkpoint ({', '.join(map(str, args.checkpoint_steps))} steps), {args.num_inference_steps}"
        f" sampler steps. Learning rates ({sweep_rule(args)}): "
        + ", ".join(f"{m} {v['learning_rate']:g}" for m, v in selection.items())
        + ".",
        "",
    ]
    if base_summary:
        base_means = {METRIC_NAMES[k]: f"{v['mean']:.3f}" for k, v in base_summary.items()}
        lines += [_listing("Base model", base_means), ""]
    if aggregates:
        at_final = [a for a in aggregates if a["step"] == final]
        lines += [
            f"## At {final} steps (mean [95% interval]; Δ paired to {BASELINE}, * where it excludes 0)",
            "",
            comparison_markdown(at_final, BASELINE),
            "",
            *significance_sentences(at_final, final),
            "",
            "## Every checkpoint",
            "",
            comparison_markdown(aggregates, BASELINE),
            "",
        ]
        curve = [
            (row["class_clip_t"], row["clip_i"], row["method"])
            for row in mean_curves(run_rows, methods, args.checkpoint_steps)
        ]
        if base_summary:
            curve.append((base_summary["class_clip_t"]["mean"], base_summary["clip_i"]["mean"], "base"))
        plot = scatter_plot(
            curve,
            "class CLIP-T (class preservation)",
            "CLIP-I (subject fidelity)",
            title=f"fidelity vs preservation over {', '.join(map(str, args.checkpoint_steps))} steps",
            colors={**METHOD_COLORS, "sara_matched": "#ff7f0e"},
            connect=True,
        )
        save_image(suite.out / "fidelity_vs_preservation.png", plot)
        lines += ["![fidelity vs preservation](fidelity_vs_preservation.png)", ""]
    if real_vs_real:
        lines += [_listing("Class FID floor (real vs real class scenes, world-CLIP features)",
                           {k: f"{v:.2f}" for k, v in real_vs_real.items()}), ""]
    lines += [
        markdown_table(
            [
                {
                    "method": m,
                    "learning rate": v["learning_rate"],
                    "tried": ", ".join(f"{t['learning_rate']:g}" for t in v["tried"]),
                }
                for m, v in selection.items()
            ],
            ["method", "learning rate", "tried"],
        ),
        f"Time: training {timing['train_s'] / 60:.0f} min, scoring {timing['score_s'] / 60:.0f} min of wall "
        f"time{cpu_minutes(timing)} (machine: "
        f"{', '.join(f'{k} {v}' for k, v in result['machine'].items())}).",
    ]
    write_text(suite.out / "benchmark_suite.md", "\n".join(lines) + "\n")
    return result


def mean_curves(run_rows: list[dict], methods: list[str], steps: list[int]) -> list[dict[str, Any]]:
    """Per method, the mean over runs at each checkpoint, in step order (one curve per method)."""
    import numpy as np

    curves = []
    for method in methods:
        for step in steps:
            rows = [r for r in run_rows if r["method"] == method and r["step"] == step]
            if rows:
                curves.append(
                    {
                        "method": method,
                        "step": step,
                        **{k: float(np.mean([r[k] for r in rows])) for k in ("clip_i", "class_clip_t")},
                    }
                )
    return curves


# ---------------------------------------------------------------- several folders, one grid

SELECTION_FILE = "sweep/selection.json"
# One run (its checkpoints, and for a sweep run its scores) or one scored set each: they move whole.
GRID_CELLS = ("runs/*/seed*/*", "sweep/*/lr*", "eval/*/base/*/*", "eval/*/seed*/step*/*/*")


def merge_grid(target: Path, source: Path) -> dict[str, int]:
    """Copy ``source``'s runs, scores, sweep runs and class images into ``target`` where ``target``
    lacks them, and merge the bookkeeping (the sweep's selection, timings). Refused, before anything is
    copied, when the two folders are not one grid: swept on another subject or seed, or a method swept
    to another rate."""
    from difftune.io import write_json

    theirs = read_json(source / SELECTION_FILE, missing_ok=True)
    if theirs is None:
        raise DifftuneError(f"--merge_from {source}: no {SELECTION_FILE} there: not a subject benchmark "
                            "folder (or its sweep has not finished)")
    ours = read_json(target / SELECTION_FILE, missing_ok=True) or {"methods": {}}
    for key in ("subject", "seed"):
        if key in ours and ours[key] != theirs.get(key):
            raise DifftuneError(f"--merge_from {source}: its sweep ran on {key} {theirs.get(key)!r}, this "
                                f"folder's on {ours[key]!r} ({SELECTION_FILE}): not one grid")
    for method, entry in theirs["methods"].items():
        mine = ours["methods"].get(method)
        if mine is not None and not math.isclose(mine["learning_rate"], entry["learning_rate"]):
            raise DifftuneError(f"--merge_from {source}: {method} was swept to {entry['learning_rate']:g} "
                                f"there and {mine['learning_rate']:g} here ({SELECTION_FILE}): not one grid")
    counts = copy_missing_files(source, target, ("runs", "eval", "sweep", "class_images"),
                                skip=(SELECTION_FILE,), cells=GRID_CELLS)
    methods = {**theirs["methods"], **ours["methods"]}
    write_json(target / SELECTION_FILE, {**theirs, **ours, "methods": methods})
    timings = read_json(source / "timings.json", missing_ok=True) or {}
    own_timings = read_json(target / "timings.json", missing_ok=True) or {}
    write_json(target / "timings.json", {**timings, **own_timings})
    return {**counts, "timings": len(timings)}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    subjects = load_subjects(args)
    suite = Suite(args)
    for subject in subjects:  # a bad prompt list or identifier fails now, not after hours of training
        run_prompts(suite.test_prompts, subject.subject, args.num_prompts, True)
        run_prompts(suite.validation_prompts, subject.subject, None, True)
        if args.class_reference == "world":
            world_class_images(subject, 1, "heldout_b")
    metrics_cli.check_evaluation_arguments(args, suite.model)
    if args.merge_from:
        for source in args.merge_from:
            counts = merge_grid(suite.out, source)
            print(f"benchmark suite: from {source}: {counts['copied']} files copied, {counts['kept']} kept "
                  f"as they were here, {counts['timings']} timings")
        suite = Suite(args)  # reads the merged timings
    if args.report_only or args.merge_from:
        stored_selection = read_json(suite.out / "sweep" / "selection.json", missing_ok=True) or {}
        selection = stored_selection.get("methods", {})
        return write_report(suite, subjects, selection)
    sweep_runs = sum(len(args.rate_grids[m.name]) for m in args.methods if len(args.rate_grids[m.name]) > 1)
    grid_runs = len(args.seeds) * len(subjects) * len(args.methods)
    with tqdm(total=sweep_runs + grid_runs, desc="benchmark suite", unit="run") as bar:
        selection = run_sweep(suite, subjects, bar)
        run_grid(suite, subjects, selection, bar)
    result = write_report(suite, subjects, selection)
    print((suite.out / "benchmark_suite.md").read_text())
    return result
