"""Each method against LoRA: train LoRA, SaRA, SVFit and TLoRA the same way, evaluate, tabulate.

Every method is trained by ``difftune train-subject`` (a subprocess: same data,
steps, seed and batch for all) and evaluated in this process with the same prompts,
seeds and metric models (``difftune.metrics.subject``). Budgets are made comparable:
LoRA (rank 4 on attention) is trained first and SaRA gets exactly LoRA's number of
trainable parameters; SVFit and TLoRA use their papers' settings on attention.

Writes under ``--output_dir``: ``train/<method>/`` (adapter, train_summary.json,
train.log), ``eval/<method>/<subject>/`` (images, grid, metrics), ``class_images/``
(the FID reference, made by the base model), and ``benchmark.md`` / ``.csv`` / ``.json``
with ``fid_vs_params.png``, ``clip_t_vs_dino.png`` and ``pres_vs_fidelity.png``. Every
model also draws the prompts with the identifier removed (same seeds), so the table shows
what fine-tuning cost the class (PRES, class CLIP-T) beside what it gained on the subject;
``--no_class_prompts`` skips that half of the generation. Finished methods are neither
retrained nor re-evaluated; an interrupted training resumes from its last checkpoint.

    # the embedded default, offline on CPU (python eval/benchmark.py in a checkout is the same)
    difftune benchmark --output_dir outputs/benchmark

    # SD 1.5 from the hub on a GPU: one flag
    difftune benchmark --preset sd15 --output_dir outputs/benchmark_sd15
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import difftune
from difftune.errors import DifftuneError, run_main
from difftune.machine import machine_description
from difftune.metrics.cli import (
    HUB_CLIP,
    HUB_DINO,
    add_evaluation_arguments,
    build_scorer,
    check_evaluation_arguments,
    evaluation_options,
    load_eval_pipeline,
    resolve_device,
    resolve_prompt_file,
)
from difftune.metrics.subject import (
    ASSETS_DIR,
    PRIOR_COLUMNS,
    SUMMARY_HEADERS,
    EvalRun,
    Subject,
    evaluate_runs,
    load_images,
    models_note,
    prior_columns,
    run_prompts,
)
from difftune.options import argument_type
from difftune.paths import subject_folder
from difftune.training.arguments import option_dest

from . import train_subject
from .benchmark_runs import ADAPTER_FILE, METHOD_COLORS, train_method, trainer_flags

ALL_METHODS = ("lora", "sara", "svfit", "tlora")
BASELINE = "lora"

# Trainer flags per method (comparable budgets; see the module docstring). SaRA's budget is
# filled in from LoRA's trainable parameter count unless --method_args sets SaRA's flags.
METHOD_ARGS: dict[str, list[str]] = {
    "lora": ["--targets", "attn", "--rank", "4"],
    "sara": [],
    "svfit": ["--targets", "attn"],
    "tlora": ["--targets", "attn"],
}

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded world model: minutes on a laptop CPU, fully offline.
    "embedded": {
        "pretrained_model_name_or_path": "builtin:embedded",
        "instance_data_dir": ASSETS_DIR / "subjects" / "star",
        "max_train_steps": 200,
        "train_batch_size": 4,
        "mixed_precision": "no",
        "images_per_prompt": 2,
        "num_inference_steps": 25,
        "guidance_scale": 5.0,  # the world model's sampling default
        "num_class_images": 100,
        "checkpointing_steps": 100,
    },
    # Stable Diffusion 1.5 from the hub, on a GPU (fp16 training and generation).
    "sd15": {
        "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "instance_data_dir": ASSETS_DIR / "subjects" / "star",
        "resolution": 512,
        "max_train_steps": 400,
        "train_batch_size": 1,
        "mixed_precision": "fp16",
        "images_per_prompt": 4,
        "num_inference_steps": 25,
        "guidance_scale": 7.5,
        "num_class_images": 200,
        "checkpointing_steps": 200,
        "clip_model": HUB_CLIP,
        "dino_model": HUB_DINO,
    },
}

TABLE_COLUMNS = ["method", "trainable_parameters", "peak_memory_gib", "step_time_s", "fid", "clip_score",
                 "dino", "clip_i", "clip_t", "vlhi"]
TABLE_HEADERS = {"trainable_parameters": "trainable params", "peak_memory_gib": "peak memory (GiB)",
                 "step_time_s": "step time (s)", "fid": "FID ↓", "clip_score": "CLIP ↑", "dino": "DINO ↑",
                 "clip_i": "CLIP-I ↑", "clip_t": "CLIP-T ↑", "vlhi": "VLHI ↑", "pres": "PRES ↓",
                 "pres_clip_i": "PRES-CLIP-I ↓", "class_clip_t": "class CLIP-T ↑"}


# ---------------------------------------------------------------- options

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="store_true",
                        help="the benchmark with power: every method on several subjects and seeds, with "
                             "intervals (benchmark_suite.py; its own flags: --suite --help)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded",
                        help="defaults for everything below: 'embedded' (CPU, offline) or 'sd15' (GPU, hub)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"methods to compare (default: those of {' '.join(ALL_METHODS)} that are "
                             "installed); LoRA is the baseline")
    parser.add_argument("--method_args", action="append", default=[], metavar="METHOD=FLAGS",
                        help="trainer flags of one method, replacing its defaults, e.g. "
                             "'sara=--sara_threshold 2e-3' (repeatable)")
    parser.add_argument("--train_args", default="", help="extra trainer flags for every method")
    parser.add_argument("--retrain", action="store_true", help="train again even if an adapter exists")
    parser.add_argument("--no_base", action="store_true", help="do not evaluate the base model")
    group = parser.add_argument_group("training (the same for every method)")
    group.add_argument("--pretrained_model_name_or_path")
    group.add_argument("--instance_data_dir", type=argument_type(subject_folder),
                       help="the subject's images, or a shipped subject (builtin:heart, ...)")
    group.add_argument("--identifier", default=None, help="default: the subject's subject.json, else sks")
    group.add_argument("--class_name", default=None, help="default: the subject's subject.json")
    group.add_argument("--instance_prompt", default=None, help="default: 'a <identifier> <class>'")
    group.add_argument("--class_prompt", default=None, help="default: 'a <class>' (class images, FID)")
    group.add_argument("--max_train_steps", type=int)
    group.add_argument("--train_batch_size", type=int)
    group.add_argument("--learning_rate", type=float, default=None,
                       help="one learning rate for all (default: each method's own rule)")
    group.add_argument("--resolution", type=int, default=None)
    group.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"))
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--checkpointing_steps", type=int)
    group.add_argument("--with_prior_preservation", action="store_true",
                       help="train with the prior loss on the class images")
    group.add_argument("--num_class_images", type=int, help="class images (FID reference, prior)")
    group.add_argument("--class_data_dir", type=Path, default=None,
                       help="class images; missing ones are generated by the base model (default: "
                            "<output_dir>/class_images)")
    add_evaluation_arguments(parser)
    parser.set_defaults(fid=True)
    parser.add_argument("--no_fid", dest="fid", action="store_false", help="skip FID/KID")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = [m for m in ALL_METHODS if m in difftune.METHODS]
        missing = [m for m in ALL_METHODS if m not in difftune.METHODS]
        if missing:
            print(f"note: {', '.join(missing)} not registered in this difftune; "
                  f"comparing {', '.join(args.methods)}")
    unknown = [m for m in args.methods if m not in difftune.METHODS]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not available here (registered: "
                     f"{', '.join(sorted(difftune.METHODS))})")
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods lists a method twice")
    overrides = {}
    for spec in args.method_args:
        method, sep, flags = spec.partition("=")
        if not sep or method not in args.methods:
            parser.error(f"--method_args {spec!r}: expected METHOD=FLAGS with METHOD one of {args.methods}")
        try:
            overrides[method] = shlex.split(flags)
        except ValueError as err:  # an unclosed quote
            parser.error(f"--method_args {spec!r}: cannot split the flags: {err}")
    args.method_flags = {m: overrides.get(m, METHOD_ARGS.get(m, [])) for m in args.methods}
    args.method_overridden = set(overrides)
    try:
        shlex.split(args.train_args)
    except ValueError as err:
        parser.error(f"--train_args {args.train_args!r}: cannot split the flags: {err}")
    args.class_data_dir = args.class_data_dir or args.output_dir / "class_images"
    return args


# ---------------------------------------------------------------- training (subprocesses)

def check_trainer_flags(args: argparse.Namespace, subject: Subject) -> None:
    """Each method's trainer command checked by the trainer itself (its parser and every check it makes
    before loading a model), before class images are generated or any method trains: a bad flag in
    --train_args or --method_args fails in seconds, not after the first methods have run."""
    for method in args.methods:
        output_dir = args.output_dir / "train" / method
        flags = trainer_flags(args, subject, method, args.method_flags[method], output_dir)
        try:
            train_subject.check_before_loading(flags)
        except DifftuneError as err:
            raise DifftuneError(f"trainer flags of {method}: {err}") from None
        except SystemExit:  # argparse has printed which flag it refused
            raise DifftuneError(f"trainer flags of {method} refused by {Path(train_subject.__file__).name} "
                                f"(see above): {shlex.join(flags)}") from None


# ---------------------------------------------------------------- class images and evaluation

def ensure_class_images(args: argparse.Namespace, pipe: Any) -> list:
    """The FID reference: ``num_class_images`` base-model images of the class prompt (kept on disk)."""
    from difftune.training.prior import ensure_class_images as generate_missing

    generate_missing(pipe, args.class_data_dir, args.class_prompt, args.num_class_images, seed=args.seed,
                     resolution=args.height or pipe_resolution(pipe), batch_size=args.generation_batch_size,
                     num_inference_steps=args.num_inference_steps)
    return load_images(args.class_data_dir, "class images")[: args.num_class_images]


def pipe_resolution(pipe: Any) -> int:
    denoiser, _ = difftune.find_denoiser(pipe)
    return int(denoiser.config.sample_size) * int(pipe.vae_scale_factor)


def benchmark_rows(methods: list[str], summaries: dict[str, dict], results: dict[str, dict]) -> list[dict]:
    """One row per model (base first), with VLHI over the trained methods."""
    from difftune.metrics import vlhi

    rows = []
    for name, result in results.items():
        summary = summaries.get(name, {})
        fid = (result.get("fid") or {}).get("fid")
        peak = summary.get("peak_memory_bytes")
        rows.append({
            "method": name,
            "trainable_parameters": summary.get("trainable_parameters", 0 if name == "base" else None),
            "peak_memory_gib": peak / 2**30 if peak else None,
            "peak_memory_kind": summary.get("peak_memory_kind"),
            "step_time_s": summary.get("step_time_s"),
            "fid": fid,
            "clip_score": result.get("clip_score"),
            "dino": result.get("dino"),
            "clip_i": result.get("clip_i"),
            "clip_t": result.get("clip_t"),
            **{column: result.get(column) for column in PRIOR_COLUMNS},
        })
    trained = [r for r in rows if r["method"] in methods]
    index = vlhi({r["method"]: r["fid"] for r in trained}, {r["method"]: r["clip_score"] for r in trained})
    for row in rows:
        row["vlhi"] = index.get(row["method"])
    return rows


def write_report(args: argparse.Namespace, rows: list[dict], results: dict[str, dict], machine: dict) -> str:
    from difftune.io import save_image, write_json
    from difftune.metrics.reporting import markdown_table, scatter_plot, write_csv
    from difftune.metrics.subject import fid_note

    out = args.output_dir
    prior = prior_columns(list(results.values()))
    columns = [*TABLE_COLUMNS[:-1], *prior, TABLE_COLUMNS[-1]]  # VLHI stays last
    write_csv(out / "benchmark.csv", rows, [*columns, "peak_memory_kind"])
    write_json(out / "benchmark.json", {"rows": rows, "machine": machine, "preset": args.preset,
                                        "model": args.pretrained_model_name_or_path,
                                        "steps": args.max_train_steps, "seed": args.seed,
                                        "method_flags": args.method_flags})
    trained = [r for r in rows if r["method"] != "base"]
    fid_plot = scatter_plot([(r["trainable_parameters"], r["fid"], r["method"]) for r in trained],
                            "trainable parameters", "FID (lower is better)",
                            title="FID vs trainable parameters", log_x=True, colors=METHOD_COLORS)
    save_image(out / "fid_vs_params.png", fid_plot)
    has_dino = any(r["dino"] is not None for r in rows)
    x_key, x_label = ("dino", "DINO") if has_dino else ("clip_i", "CLIP-I (no DINO model)")
    fidelity_plot = scatter_plot([(r[x_key], r["clip_t"], r["method"]) for r in rows], x_label, "CLIP-T",
                                 title=f"prompt fidelity (CLIP-T) vs subject fidelity ({x_label.split()[0]})",
                                 colors=METHOD_COLORS)
    save_image(out / "clip_t_vs_dino.png", fidelity_plot)
    if prior:  # what fine-tuning gained on the subject against what it cost the class
        pres_key = prior[0]
        prior_plot = scatter_plot([(r[x_key], r[pres_key], r["method"]) for r in rows], x_label,
                                  f"{SUMMARY_HEADERS[pres_key]} (lower is better)",
                                  title=f"prior drift vs subject fidelity ({x_label.split()[0]})",
                                  colors=METHOD_COLORS)
        save_image(out / "pres_vs_fidelity.png", prior_plot)

    kinds = sorted({r["peak_memory_kind"] for r in rows if r.get("peak_memory_kind")})
    any_result = next(iter(results.values()))
    lines = [
        f"# Each method vs LoRA: {args.pretrained_model_name_or_path}",
        "",
        f"Subject '{any_result['subject']}' ({any_result['identifier']} {any_result['class_name']}), "
        f"{args.max_train_steps} steps × batch {args.train_batch_size}, seed {args.seed}, "
        f"{any_result['prompts']} prompts × {args.images_per_prompt} images per model. "
        f"Machine: {', '.join(f'{k} {v}' for k, v in machine.items())}.",
        "",
        markdown_table(rows, columns, TABLE_HEADERS,
                       precision={"step_time_s": 3, "peak_memory_gib": 2}),
        f"{models_note(any_result['clip_model'], any_result['dino_model'], 'not computed (no model)')} "
        "CLIP = 100·max(cos, 0) with the prompt as written; CLIP-T = 100·cos with the identifier replaced "
        "by the class name; CLIP-I and DINO are mean cosines to the subject images. "
        + ("PRES is the same cosine for the images of the prompts without the identifier (same seeds; "
           "lower: the model still draws its class), class CLIP-T their CLIP-T. " if prior else "")
        + "VLHI is computed among the trained methods only.",
        f"Peak memory: {', '.join(kinds) or 'not recorded'}. Step time: mean wall time per optimizer "
        "step over the training loop (checkpoint saves included), as the trainer reports it.",
        fid_note(list(results.values())),
        "",
        "Flags per method: " + "; ".join(f"{m}: `{shlex.join(f) or '(defaults)'}`"
                                         for m, f in args.method_flags.items()),
    ]
    text = "\n".join(lines) + "\n"
    from difftune.io import write_text

    write_text(out / "benchmark.md", text)
    return text


def main(argv: list[str] | None = None) -> list[dict] | dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--suite" in argv:  # the multi-subject, multi-seed protocol with intervals: benchmark_suite.py
        from . import benchmark_suite

        return benchmark_suite.main([a for a in argv if a != "--suite"])
    args = parse_args(argv)
    model = args.pretrained_model_name_or_path
    subject = Subject.from_dir(args.instance_data_dir, args.identifier, args.class_name)
    args.instance_prompt = args.instance_prompt or f"a {subject.identifier} {subject.class_name}"
    args.class_prompt = args.class_prompt or f"a {subject.class_name}"
    options = evaluation_options(args)
    prompt_file = resolve_prompt_file(options, model)
    # a bad prompt file or an identifier the prompts keep fails now, not after every method has trained
    run_prompts(prompt_file, subject, args.num_prompts, not args.no_class_prompts)
    check_evaluation_arguments(args, model)
    check_trainer_flags(args, subject)
    device, dtype = resolve_device(options)

    if args.fid or args.with_prior_preservation:
        pipe = load_eval_pipeline(model, device, dtype)
        class_images = ensure_class_images(args, pipe)
        del pipe

    summaries: dict[str, dict] = {}
    order = sorted(args.methods, key=lambda m: m != BASELINE)  # LoRA first: SaRA's budget follows it
    for method in order:
        flags = list(args.method_flags[method])
        budget = difftune.METHODS[method].budget_option  # a method sized by a parameter budget (SaRA)
        if budget and method not in args.method_overridden and BASELINE in summaries:
            flags += [f"--{option_dest(method, budget)}", str(summaries[BASELINE]["trainable_parameters"])]
            args.method_flags[method] = flags
        summaries[method] = train_method(args, subject, method, flags)

    scorer = build_scorer(options, model, device)
    pipe = load_eval_pipeline(model, device, dtype)
    runs = [] if args.no_base else [EvalRun("base", None, subject)]
    runs += [EvalRun(m, args.output_dir / "train" / m / ADAPTER_FILE, subject) for m in order]
    fid_reference = (str(args.class_data_dir), class_images) if args.fid else None
    evaluated = evaluate_runs(pipe, runs, prompt_file, options.generation, scorer,
                              args.output_dir / "eval", model, fid_reference=fid_reference,
                              num_prompts=args.num_prompts, with_class_prompts=not args.no_class_prompts)
    results = {r["name"]: r for r in evaluated}
    rows = benchmark_rows(order, summaries, results)
    print(write_report(args, rows, results, machine_description()))
    return rows


if __name__ == "__main__":
    run_main(main)
