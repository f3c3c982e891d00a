"""One command for a machine with one CUDA GPU: install from carried wheels, measure, write a report.

On a machine with nothing but Python and torch, offline:

    python benchmarks/gpu_check.py --wheelhouse wheelhouse/ gpu_check_out/

1. ``--wheelhouse DIR`` installs difftune and its dependencies from DIR with
   ``pip install --no-index --find-links DIR`` (no network; torch is the machine's own).
   Build DIR where there is a network (docs/benchmarks.md, "GPU check"):
   ``pip wheel --no-deps -w wheelhouse .`` and ``pip download -d wheelhouse`` of the
   dependencies other than torch.
2. Within ``--budget_s`` (default 480 s) it measures, for the SD 1.5 UNet at 512 px and the
   SDXL UNet at 1024 px built from their configs (random weights, bf16 base weights with
   fp32 trainable parameters under bf16 autocast, batch 1): step time, max memory allocated
   and MFU (model FLOPs of a step, counted by torch's FlopCounterMode, over the step time and
   the card's peak bf16 rate) for LoRA r4/r16, SaRA 5M/20M/50M on both weight-gradient routes,
   SVFit, TLoRA and full fine-tuning; then the main job end to end (train and evaluate on
   the embedded model, as in the README); one-step against 25-step sampling throughput; FID
   between two sets of 10,000 feature vectors. What the budget leaves no time for is listed
   as skipped, never estimated.
3. It writes ``gpu_check.json`` and ``gpu_check.md`` into the output folder.

Without a GPU (or with ``--device cpu``) the same code runs at tiny sizes in seconds: the
test suite runs that path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# dense bf16 tensor-core peak, TFLOP/s, by a part of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
# (label, method, options, SaRA budgets at full size / at tiny size)
METHOD_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("LoRA r4", "lora", {"rank": 4}),
    ("LoRA r16", "lora", {"rank": 16}),
    *[(f"SaRA {b}M {route}", "sara", {"budget": b * 1e6, "weight_gradients": route, "lambda_rank": 0.0})
      for b in (5, 20, 50) for route in ("dense", "sampled")],
    ("SVFit", "svfit", {}),
    ("TLoRA", "tlora", {}),
    ("full fine-tuning", "full", {}),
]
TINY_BUDGET_SCALE = 1e-3  # SaRA budgets on the tiny models: 5k / 20k / 50k entries


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--wheelhouse", type=Path, help="install difftune from these wheels first (offline)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: cuda when available; cpu runs the tiny sizes")
    parser.add_argument("--budget_s", type=float, default=480.0,
                        help="seconds after which no new measurement starts (the rest is listed as skipped)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per row (after a warm-up)")
    parser.add_argument("--peak_tflops", type=float,
                        help="the card's peak bf16 TFLOP/s (default: from its name)")
    parser.add_argument("--rows", nargs="*", default=None,
                        help="only the training rows whose label starts with one of these (e.g. LoRA SaRA)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "main_job", "sampling", "fid"],
                        help="sections to leave out")
    return parser.parse_args(argv)


def install_from_wheelhouse(wheelhouse: Path) -> str:
    """pip install difftune from the carried wheels, offline; torch is the machine's own."""
    if not wheelhouse.is_dir():
        raise SystemExit(f"--wheelhouse {wheelhouse}: no such folder")
    if not any(wheelhouse.glob("difftune-*.whl")):
        raise SystemExit(f"--wheelhouse {wheelhouse}: no difftune-*.whl in it (build it with "
                         "'pip wheel --no-deps -w WHEELHOUSE .')")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
               "difftune"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"installing from {wheelhouse} failed:\n{done.stderr[-3000:]}")
    import importlib

    importlib.invalidate_caches()
    return " ".join(command)


class Budget:
    """Seconds left of the run; a section asks before it starts."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- training rows -----------------------------------------------------------------------------

def base_dtype(device):
    """bf16 base weights on a GPU; float32 for the tiny CPU path."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_unet(arch: str, device, tiny: bool):
    import torch
    from diffusers import UNet2DConditionModel

    from difftune.families.sd import SD15_UNET_CONFIG, SDFamily
    from difftune.families.sdxl import SDXL_UNET_CONFIG, SDXLFamily

    torch.manual_seed(0)
    if tiny:
        unet = (SDFamily if arch == "sd15" else SDXLFamily).build_tiny().unet
    else:
        with torch.device(device):
            unet = UNet2DConditionModel(**(SD15_UNET_CONFIG if arch == "sd15" else SDXL_UNET_CONFIG))
    return unet.to(device=device, dtype=base_dtype(device))


def unet_inputs(unet, latent: int, device) -> dict[str, Any]:
    import torch

    config = unet.config
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, config.in_channels, latent, latent, generator=gen),
              "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=gen)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=gen),
                                       "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8,
                                                                  latent * 8]], dtype=torch.float32)}
    return {k: (v.to(device) if torch.is_tensor(v) else {kk: vv.to(device) for kk, vv in v.items()})
            for k, v in inputs.items()}


def train_row(unet, method: str, options: dict, inputs: dict, device, steps: int) -> dict[str, Any]:
    """Attach, time ``steps`` training steps after a warm-up, count one step's FLOPs, remove."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params
    from torch.utils.flop_counter import FlopCounterMode

    import difftune

    adapter = None
    if method == "full":
        unet.float().requires_grad_(True)
        groups = [{"params": list(unet.parameters()), "weight_decay": 1e-2}]
    else:
        unet.requires_grad_(False)
        adapter = difftune.add_adapter(unet, method, **options)
        cast_training_params(unet, torch.float32)
        groups = adapter.optimizer_parameter_groups(1e-2)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    target = torch.randn_like(inputs["sample"])
    low_precision = device.type == "cuda"  # bf16 autocast is slow on CPUs: the tiny path stays fp32

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low_precision):
            loss = F.mse_loss(unet(**inputs).sample.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if adapter is not None:
            adapter.after_optimizer_step(1, 10**6, optimizer)
        optimizer.zero_grad(set_to_none=True)

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step()  # warm-up (SaRA and optimizer state allocate here)
        times = []
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        row = {"trainable": sum(p.numel() for p in params), "step_s": statistics.median(times),
               "flops": counter.get_total_flops()}
        if device.type == "cuda":
            row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if adapter is not None and method == "sara":
            routes = adapter.sparse.weight_gradient_routes()
            row["sampled_layers"] = sum(r["path"] == "sampled" for r in routes)
        return row
    finally:
        optimizer.state.clear()
        if adapter is not None:
            difftune.remove_adapter(unet)
        unet.to(base_dtype(device)).requires_grad_(False)


def training_section(device, tiny: bool, steps: int, budget: Budget, peak: float | None,
                     only: list[str] | None = None) -> list[dict]:
    import torch

    rows = []
    for arch, resolution in (("sd15", 512), ("sdxl", 1024)):
        latent = 16 if tiny else resolution // 8
        if budget.left() <= 0:
            rows.append({"arch": arch, "resolution": resolution, "skipped": "time budget"})
            continue
        unet = build_unet(arch, device, tiny)
        inputs = unet_inputs(unet, latent, device)
        for label, method, options in METHOD_ROWS:
            if only and not any(label.startswith(prefix) for prefix in only):
                continue
            row = {"arch": arch, "resolution": resolution if not tiny else latent * 8, "label": label,
                   "method": method}
            if budget.left() <= 0:
                rows.append({**row, "skipped": "time budget"})
                continue
            options = dict(options)
            if tiny and "budget" in options:
                options["budget"] *= TINY_BUDGET_SCALE
            try:
                row.update(train_row(unet, method, options, inputs, device, steps))
                if peak:
                    row["mfu"] = row["flops"] / row["step_s"] / (peak * 1e12)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as err:  # a row that fails is reported, the others still run
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(row)
        del unet, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- the main job, sampling, FID ---------------------------------------------------------------

def main_job_section(output_dir: Path, tiny: bool, budget: Budget) -> dict[str, Any]:
    """The README's main job (train on the embedded model, then evaluate), timed end to end; at
    tiny size the trainer for 2 steps on the tiny pipeline with no evaluation."""
    if budget.left() <= 0:
        return {"skipped": "time budget"}
    out = output_dir / "main_job"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    model = "builtin:tiny-sd" if tiny else "builtin:embedded"
    subject = str(ROOT / "assets" / "subjects" / "heart")
    train = [sys.executable, str(ROOT / "train_scripts" / "train_subject.py"),
             "--pretrained_model_name_or_path", model, "--instance_data_dir", subject,
             "--instance_prompt", "a large sks red heart", "--adapter", "lora", "--seed", "0",
             "--output_dir", str(out / "subject"), "--report_to", "none"]
    commands = [train + (["--max_train_steps", "2", "--skip_final_inference"] if tiny else [])]
    if not tiny:
        commands.append([sys.executable, str(ROOT / "eval" / "evaluate_subject.py"), "--adapter",
                         f"lora={out / 'subject' / 'adapter.safetensors'}", "--instance_data_dir",
                         subject, "--include_base", "--num_prompts", "25",
                         "--images_per_prompt", "2", "--output_dir", str(out / "eval")])
    start = time.perf_counter()
    for command in commands:
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                                  timeout=max(1.0, budget.left()))
        except subprocess.TimeoutExpired:
            return {"error": f"time budget ran out in {Path(command[1]).name}", "seconds": budget.left()}
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result: dict[str, Any] = {"seconds": time.perf_counter() - start, "model": model}
    results = out / "eval" / "results.json"
    if results.is_file():
        result["results"] = json.loads(results.read_text())
    return result


def sampling_section(device, tiny: bool, budget: Budget) -> dict[str, Any]:
    """Images per second of one-step and 25-step sampling of the embedded model (tiny: the tiny
    pipeline), batch 8, bf16 on GPU."""
    import torch

    from difftune.model_factory import load_pipeline

    if budget.left() <= 0:
        return {"skipped": "time budget"}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline("builtin:tiny-sd" if tiny else "builtin:embedded").to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a large red heart"] * (2 if tiny else 8)
    result: dict[str, Any] = {"batch": len(prompts)}
    for steps in (1, 25):
        pipe(prompts, num_inference_steps=steps, output_type="pt")  # warm-up
        synchronize(device)
        start = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, output_type="pt",
             generator=torch.Generator(device="cpu").manual_seed(0))
        synchronize(device)
        result[f"images_per_s_{steps}_steps"] = len(prompts) / (time.perf_counter() - start)
    return result


def fid_section(device, tiny: bool, budget: Budget) -> dict[str, Any]:
    """FID between two sets of feature vectors (10,000 × 2048 at full size), timed."""
    import torch

    from difftune.metrics.fid import frechet_distance

    if budget.left() <= 0:
        return {"skipped": "time budget"}
    count, dim = (200, 64) if tiny else (10_000, 2048)
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(count, dim, generator=gen).to(device)
    fake = (torch.randn(count, dim, generator=gen) * 1.1 + 0.05).to(device)
    synchronize(device)
    start = time.perf_counter()
    value = frechet_distance(real, fake)
    synchronize(device)
    return {"vectors": count, "dim": dim, "fid": value, "seconds": time.perf_counter() - start}


# --- report ------------------------------------------------------------------------------------

def peak_tflops(device, given: float | None) -> float | None:
    import torch

    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS.items() if part in name), None)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, difftune {report['difftune']}, peak bf16 "
             f"{report['peak_tflops'] or '?'} TFLOP/s, {report['seconds']:.0f} s in all"
             + (" (tiny sizes: no GPU)" if report["tiny"] else "") + ".", "",
             "| UNet | px | configuration | trainable | step s | max memory GiB | TFLOP/step | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["training"]:
        if "step_s" not in row:
            lines.append(f"| {row['arch']} | {row['resolution']} | {row.get('label', '–')} | "
                         f"{row.get('error') or row.get('skipped')} | | | | |")
            continue
        memory = f"{row['max_memory_allocated_gib']:.2f}" if "max_memory_allocated_gib" in row else "–"
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "–"
        lines.append(f"| {row['arch']} | {row['resolution']} | {row['label']} "
                     f"| {row['trainable'] / 1e6:.2f}M | {row['step_s']:.3f} | {memory} "
                     f"| {row['flops'] / 1e12:.2f} | {mfu} |")
    job, sampling, fid = report["main_job"], report["sampling"], report["fid"]
    lines += ["", f"Main job end to end: {job.get('seconds', 0):.0f} s" if "seconds" in job
              else f"Main job: {job.get('error') or job.get('skipped')}"]
    if "images_per_s_1_steps" in sampling:
        lines.append(f"Sampling, batch {sampling['batch']}: {sampling['images_per_s_1_steps']:.1f} images/s "
                     f"at 1 step, {sampling['images_per_s_25_steps']:.2f} images/s at 25 steps")
    if "fid" in fid:
        lines.append(f"FID of {fid['vectors']:,} × {fid['dim']} feature vectors: {fid['seconds']:.2f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    budget = Budget(args.budget_s)
    installed = install_from_wheelhouse(args.wheelhouse) if args.wheelhouse else None
    import torch

    import difftune

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if args.device != "cpu" and cuda else "cpu")
    tiny = device.type == "cpu"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    peak = peak_tflops(device, args.peak_tflops)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "difftune": difftune.__version__, "tiny": tiny, "peak_tflops": peak,
        "installed_with": installed, "budget_s": args.budget_s,
    }
    sections = [("training", lambda: training_section(device, tiny, args.steps, budget, peak, args.rows)),
                ("main_job", lambda: main_job_section(args.output_dir, tiny, budget)),
                ("sampling", lambda: sampling_section(device, tiny, budget)),
                ("fid", lambda: fid_section(device, tiny, budget))]
    for name, run in sections:
        skipped = ("train" if name == "training" else name) in args.skip
        report[name] = ([] if name == "training" else {"skipped": "--skip"}) if skipped else run()
        print(f"{name}: done, {budget.left():.0f} s of the budget left", flush=True)
    report["seconds"] = time.perf_counter() - started
    (args.output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.output_dir / "gpu_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
