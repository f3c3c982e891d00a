"""Compile time and step time of the trainers' ``--compile``, per method, against eager mode.

Each (model, method, eager/compiled) configuration runs in its own process with one
thread and a fresh inductor cache (so the compile time is a cold one): the denoiser gets
its adapter, then `loop.compile_denoiser` (regional compilation of the repeated blocks
where diffusers lists them, as ``--compile`` does), then full training steps (forward,
MSE loss, backward, AdamW) on random latents. Compile time is the first step's time minus
the median step time, as wall and as process CPU time (steadier on a shared machine; the
ratio uses it); the eager and compiled runs of a configuration follow each other.

    python benchmarks/compile_speed.py --write-docs
    python benchmarks/compile_speed.py --models tiny --methods lora sara
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## torch.compile: compile time and step time"
# latent size and batch per model; "embedded" is the shipped world model's UNet
MODELS = {"tiny": (32, 1), "embedded": (32, 4)}
METHOD_OPTIONS = {"sara": {"budget": 0.05}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["lora", "sara", "svfit", "tlora"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first (compiling) one")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_denoiser(model: str):
    from difftune.model_factory import load_pipeline

    return load_pipeline("builtin:tiny-sd" if model == "tiny" else "builtin:embedded").unet


def run_child(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    import difftune
    from difftune.training.loop import compile_denoiser

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = load_denoiser(spec["model"])
    unet.requires_grad_(False)
    unet.train()
    adapter = difftune.add_adapter(unet, spec["method"], **METHOD_OPTIONS.get(spec["method"], {}))
    how = compile_denoiser(unet, spec["backend"]) if spec["compiled"] else "eager"
    optimizer = torch.optim.AdamW(adapter.optimizer_parameter_groups(0.0), lr=1e-4)
    size, batch = MODELS[spec["model"]]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    text = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.full((batch,), 500)
    times, cpu_times = [], []
    for _ in range(spec["steps"] + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        extra = adapter.regularization_loss()
        loss = F.mse_loss(unet(latents, timesteps, text).sample, latents)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    step, cpu_step = statistics.median(times[1:]), statistics.median(cpu_times[1:])
    return {**spec, "how": how, "first_s": times[0], "step_s": step, "compile_s": max(0.0, times[0] - step),
            "cpu_step_s": cpu_step, "cpu_compile_s": max(0.0, cpu_times[0] - cpu_step),
            "parameters": sum(p.numel() for p in unet.parameters())}


def run_all(specs: list[dict]) -> list[dict]:
    """Every configuration once, in its own process, with a cold inductor cache of its own."""
    from tqdm.auto import tqdm

    results = []
    for spec in tqdm(specs, desc="configurations", unit="process"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache,
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                  capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            results.append(json.loads(lines[-1]))
        else:
            tqdm.write(f"{spec}: failed\n{done.stderr[-2000:]}")
            results.append({**spec, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
    return results


def table(results: list[dict], args, load: tuple[str, str]) -> str:
    import torch

    from difftune.machine import cpu_name

    lines = ["| model | method | mode | compile s (wall) | compile CPU s | step s (wall) | step CPU s "
             "| CPU step × eager |", "|---|---|---|---|---|---|---|---|"]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['method']} | compiled | failed: {row['error'][:60]} "
                         "| | | | |")
            continue
        eager = next((r for r in results if r["model"] == row["model"] and r["method"] == row["method"]
                      and not r["compiled"] and "error" not in r), None)
        ratio = f"{row['cpu_step_s'] / eager['cpu_step_s']:.2f}" if eager else "–"
        mode = row["how"] if row["compiled"] else "eager"
        compile_times = "– | –"
        if row["compiled"]:
            compile_times = f"{row['compile_s']:.0f} | {row['cpu_compile_s']:.0f}"
        lines.append(f"| {row['model']} ({row['parameters'] / 1e6:.1f}M) | {row['method']} | {mode} "
                     f"| {compile_times} | {row['step_s']:.3f} | {row['cpu_step_s']:.3f} | {ratio} |")
    header = (f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread per "
              f"process, backend {args.backend}, a cold inductor cache per process; load average "
              f"(1/5/15 min) {load[0]} before, {load[1]} after. Training steps (forward, MSE, backward, "
              f"AdamW) on random latents: tiny UNet batch 1 at 32×32 latents, the embedded model's UNet "
              f"batch 4 at 32×32; median of {args.steps} steps after the first (compiling) one; "
              "the eager and compiled runs of a configuration follow each other. 'regional' compiles the "
              "model's repeated blocks (`compile_repeated_blocks`), as `--compile` does where diffusers "
              "lists them.")
    return header + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    specs = [{"model": model, "method": method, "compiled": compiled, "steps": args.steps,
              "backend": args.backend}
             for model in args.models for method in args.methods for compiled in (False, True)]
    before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results = run_all(specs)
    after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = table(results, args, (before, after))
    print(text)
    if args.write_docs:
        command = "python benchmarks/compile_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = f"{SECTION}\n\nCommand: `{command.strip()}`\n\n{text}"
        content = DOCS.read_text()
        if SECTION in content:
            start = content.index(SECTION)
            following = content.find("\n## ", start + len(SECTION))
            content = content[:start] + body + ("\n" + content[following + 1:] if following >= 0 else "")
        else:
            content = content.rstrip("\n") + "\n\n" + body
        DOCS.write_text(content)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
