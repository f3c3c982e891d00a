"""Training-step time of SVFit and TLoRA against LoRA r4 on the SD 1.5-size UNet.

One process builds the UNet from its config (random weights, fp32), then for each
configuration attaches the adapter, times full training steps (forward, MSE loss,
backward, AdamW step) and removes it again. Configurations are interleaved over
``--rounds`` rounds so that a slow period of a shared machine hits all of them; the table
gives the median step time and its ratio to LoRA r4 from the same run. SVFit and TLoRA
are also timed with their forward pass forced to each form (factored / dense) to show
what the automatic choice buys.

    python benchmarks/speed_methods.py --write-docs            # CPU, 256 px
    python benchmarks/speed_methods.py --device cuda --write-docs  # GPU, 512 px

Needs about 6 GiB of RAM on CPU (on a shared machine run it under a lock, e.g. flock).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import difftune
from difftune.errors import run_main
from difftune.families.sd import SD15_UNET_CONFIG
from difftune.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Step time: SVFit and TLoRA vs LoRA"
TARGET_RATIO = 1.3

# (label, method, options, forward modes to time: "auto" is what users get)
CONFIGS: list[tuple[str, str, dict, tuple[str, ...]]] = [
    ("LoRA r=4", "lora", {"rank": 4}, ("default",)),
    ("SVFit (energy 0.99)", "svfit", {}, ("auto", "factored", "dense")),
    ("TLoRA(2, 6): TRM R=2 + TR R=6", "tlora", {"transform_rank": 2, "residual": "tr", "rank": 6},
     ("auto", "factored", "dense")),
    ("TLoRA*(2, 4): TRM R=2 + LoRA r=4", "tlora", {"transform_rank": 2, "residual": "lora", "rank": 4},
     ("auto",)),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels (default 256 on CPU, 512 on GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after each attach/mode switch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: its process CPU time then measures the "
                             "work even on a shared machine)")
    parser.add_argument("--targets", default="attn")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section in {DOCS.name}")
    return parser.parse_args()


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"CPU {cpu_name()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def build_unet(device: torch.device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).to(device)


def make_step(unet, inputs, target):
    def step(optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(unet(**inputs, return_dict=False)[0], target)
        loss.backward()
        optimizer.step()
        if inputs["sample"].device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    resolution = args.resolution or (512 if device.type == "cuda" else 256)
    latent = resolution // 8
    print(f"building the SD 1.5-size UNet on {device} ...", flush=True)
    unet = build_unet(device)
    unet.train()
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(1, 4, latent, latent, generator=gen).to(device),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 77, 768, generator=gen).to(device),
    }
    target = torch.randn(1, 4, latent, latent, generator=gen).to(device)
    step = make_step(unet, inputs, target)

    times: dict[tuple[str, str], list[float]] = {}
    cpu_times: dict[tuple[str, str], list[float]] = {}
    extra: dict[str, str] = {}
    total = args.rounds * sum(len(modes) * (args.steps + args.warmup) for *_, modes in CONFIGS)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tqdm(total=total, desc="training steps", unit="step") as progress:
        for round_index in range(args.rounds):
            for label, method, options, modes in CONFIGS:
                start = time.perf_counter()
                adapter = difftune.add_adapter(unet, method, targets=args.targets, **options)
                attach_seconds = time.perf_counter() - start
                count = difftune.count_trainable_parameters(unet)
                extra[label] = f"{count / 1e6:.3f}M params, attach {attach_seconds:.1f} s"
                if method == "svfit":
                    ranks = [layer.rank for layer in adapter.layers.values()]
                    full = [min(layer.base_layer.weight.shape[0], layer.base_layer.weight[0].numel())
                            for layer in adapter.layers.values()]
                    extra[label] += f", mean rank {sum(ranks) / sum(full):.0%} of full"
                optimizer = torch.optim.AdamW(difftune.trainable_parameters(unet), lr=1e-4)
                order = modes if round_index % 2 == 0 else tuple(reversed(modes))
                for mode in order:
                    if mode != "default":
                        adapter.set_forward_mode(mode)
                    for _ in range(args.warmup):
                        step(optimizer)
                        progress.update()
                    for _ in range(args.steps):
                        start, cpu_start = time.perf_counter(), time.process_time()
                        step(optimizer)
                        times.setdefault((label, mode), []).append(time.perf_counter() - start)
                        cpu_times.setdefault((label, mode), []).append(time.process_time() - cpu_start)
                        progress.update()
                del optimizer
                difftune.remove_adapter(unet)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    # On CPU the ratio uses the process CPU time (single-threaded it is the work done, which
    # other jobs on a shared machine do not inflate); on a GPU the wall time.
    measure = cpu_times if device.type == "cpu" else times
    baseline = statistics.median(measure[(CONFIGS[0][0], "default")])
    rows = ["| configuration | forward | trainable, attach | step CPU s (median) | step wall s (median) "
            "| ratio to LoRA r=4 | within 1.3× |", "|---|---|---|---|---|---|---|"]
    for label, _method, _options, modes in CONFIGS:
        for mode in modes:
            ratio = statistics.median(measure[(label, mode)]) / baseline
            verdict = "yes" if ratio <= TARGET_RATIO else "no"
            shown_mode = "peft" if mode == "default" else mode
            rows.append(f"| {label} | {shown_mode} | {extra[label]} "
                        f"| {statistics.median(cpu_times[(label, mode)]):.2f} "
                        f"| {statistics.median(times[(label, mode)]):.2f} | {ratio:.2f}× | {verdict} |")
    table = "\n".join(rows)
    load = ""
    if load_before and load_after:
        load = f" Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after."
    header = (f"Machine: {machine_description(device)}. SD 1.5 UNet config, random weights, fp32, "
              f"batch 1, {resolution} px ({latent}×{latent} latent), targets `{args.targets}` "
              f"(128 attention projections), AdamW; median of {args.rounds}×{args.steps} timed steps "
              f"per row after {args.warmup} warm-up step(s), configurations interleaved; "
              f"ratio from {'process CPU time' if device.type == 'cpu' else 'wall time'}.{load}")
    print(header + "\n\n" + table)
    if args.write_docs:
        write_docs_section(header, table, device)


def write_docs_section(header: str, table: str, device: torch.device) -> None:
    command = ("python benchmarks/speed_methods.py --write-docs" if device.type == "cpu" else
               "python benchmarks/speed_methods.py --device cuda --write-docs")
    body = (f"{SECTION}\n\n`{command}`\n\n"
            f"{'CPU' if device.type == 'cpu' else 'GPU'} run. {header}\n\n{table}\n")
    if device.type == "cpu":
        body += "\nGPU (512 px): not measured: no GPU available.\n"
    text = DOCS.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    notes_marker = "<!-- speed notes -->"
    notes = ""
    if notes_marker in text[start:end if end >= 0 else None]:
        section = text[start:end if end >= 0 else None]
        notes = section[section.index(notes_marker):].rstrip("\n") + "\n"
    new_section = body + ("\n" + notes if notes else "")
    text = text[:start] + new_section + (text[end:] if end >= 0 else "")
    DOCS.write_text(text)
    print(f"updated {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    run_main(main)
