"""Memory and step time of SaRA against LoRA and full fine-tuning, at SD 1.5 size.

Builds the SD 1.5 UNet from its config (random weights, no download) and repeats one
training step (forward, backward, clip to 1.0, AdamW step) in each mode, every mode in
its own process so that peak memory is its own:

- ``lora-r4``: peft LoRA rank 4 on the attention projections (the reference, ratio 1);
- ``sara``: SaRA with unstructured backprop (difftune's adapter, default options,
  selection by budget); ``sara-no-rank``: the same with lambda_rank 0 (no SVD);
- ``sara-dense``: SaRA without the hook: the targeted weights are trained densely with
  their gradients masked (dense gradients, dense AdamW state, one byte per weight of mask);
- ``lora-budget``: peft LoRA on every Linear/Conv with the rank that gives the budget;
- ``full``: full fine-tuning.

CPU: peak RSS (``ru_maxrss``) at 256 px, batch 1. GPU (``--device cuda``):
``torch.cuda.max_memory_allocated`` at 512 px, batches 1/4/8. The table goes to stdout
and into its section of docs/benchmarks.md, a bar chart next to it. Run it alone on the machine
(full fine-tuning needs about 14 GiB).

    python benchmarks/memory_sara.py                  # CPU, budgets 5M/20M/50M
    python benchmarks/memory_sara.py --device cuda --batch_sizes 1 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Memory: SaRA vs LoRA vs full fine-tuning"
SUBSECTIONS = {"cpu": "### CPU: peak RSS, 256 px, batch 1", "cuda": "### GPU: max_memory_allocated, 512 px"}
NOT_MEASURED = {"cpu": "not measured yet\n", "cuda": "not measured: no GPU available\n"}
BUDGET_MODES = ("sara", "sara-dense", "lora-budget")
LABELS = {
    "lora-r4": "peft LoRA r4, attention",
    "sara": "SaRA, unstructured backprop",
    "sara-no-rank": "SaRA, unstructured backprop, λ_rank = 0",
    "sara-dense": "SaRA dense-masked (no hook)",
    "lora-budget": "peft LoRA, all layers, same budget",
    "full": "full fine-tuning",
    "weight-grads": "weight gradients only (dropped, no optimizer)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[5e6, 2e7, 5e7])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                        help="default: 1 on CPU, 1 4 8 on GPU")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 256 CPU, 512 GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every mode this many times, alternating, and keep its fastest "
                             "round (steadier ratios on a shared machine)")
    parser.add_argument("--modes", nargs="+", default=None, help="subset of modes to run")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="markdown file whose SaRA section is replaced ('' to skip)")
    parser.add_argument("--unet", default="sd15", choices=["sd15", "tiny"],
                        help="sd15: the SD 1.5 UNet config; tiny: the test UNet (smoke runs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- one mode, in its own process ----------------------------------------------------------

def run_child(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    import difftune
    from difftune.families.sd import SD15_UNET_CONFIG

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec["unet"] == "tiny":
        from difftune.families.sd import SDFamily

        unet = SDFamily.build_tiny().unet.to(device)
    else:
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device)
    unet.train()
    mode, budget = spec["mode"], spec.get("budget")
    adapter, masks = None, {}
    if mode == "lora-r4":
        difftune.add_adapter(unet, "lora", targets="attn", rank=4)
        groups = [{"params": difftune.trainable_parameters(unet), "weight_decay": 1e-2}]
    elif mode == "lora-budget":
        difftune.add_adapter(unet, "lora", targets="all", rank=lora_rank_for(unet, budget))
        groups = [{"params": difftune.trainable_parameters(unet), "weight_decay": 1e-2}]
    elif mode in ("sara", "sara-no-rank"):
        options = {"lambda_rank": 0.0} if mode == "sara-no-rank" else {}
        adapter = difftune.add_adapter(unet, "sara", budget=budget, **options)
        groups = adapter.optimizer_parameter_groups(1e-2)
    elif mode == "sara-dense":
        masks = dense_masks(unet, budget)
        groups = [{"params": list(masks), "weight_decay": 0.0}]
    elif mode == "full":
        groups = [{"params": list(unet.parameters()), "weight_decay": 1e-2}]
    elif mode == "weight-grads":
        drop_weight_gradients(unet)
        groups = []
    else:
        raise SystemExit(f"unknown mode {mode}")
    params = [p for g in groups for p in g["params"]]
    trainable = sum(m.sum().item() for m in masks.values()) if masks else sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(groups, lr=1e-4) if groups else None

    batch, latent = spec["batch"], spec["resolution"] // 8
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, latent, latent, generator=gen).to(device)
    noise = torch.randn(batch, 4, latent, latent, generator=gen).to(device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen).to(device)
    timesteps = torch.full((batch,), 500, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for step in range(spec["steps"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        # the low-rank term first: its decomposition's temporaries never meet the activations
        extra = adapter.regularization_loss() if adapter is not None else None
        loss = F.mse_loss(unet(latents, timesteps, text).sample, noise)
        (loss if extra is None else loss + extra).backward()
        if adapter is not None:
            adapter.before_optimizer_step(step + 1, 10**6)
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if adapter is not None:
                adapter.after_optimizer_step(step + 1, 10**6, optimizer)
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {"mode": mode, "budget": budget, "batch": batch, "trainable": int(trainable),
              "seconds": statistics.median(times[1:]), "all_seconds": times,
              "cpu_seconds": statistics.median(cpu_times[1:])}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def lora_rank_for(unet, budget: float) -> int:
    """The LoRA rank whose parameter count on every Linear/Conv is closest to the budget."""
    from torch import nn

    per_rank = 0
    for module in unet.modules():
        if isinstance(module, nn.Linear):
            per_rank += module.in_features + module.out_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_rank += module.in_channels * kh * kw + module.out_channels
    return max(1, round(budget / per_rank))


def sara_default_tensors(unet) -> dict:
    """The tensors SaRA selects from by default: every Linear/Conv weight, no biases or norms."""
    from difftune.targeting import resolve_targets
    from difftune.tuners.sara.selection import targeted_tensors

    return targeted_tensors(unet, resolve_targets(unet, "all"), include_bias_norm=False)


def dense_masks(unet, budget: float) -> dict:
    """SaRA without the hook: train whole weights, mask their gradients (bool per weight)."""
    from difftune.tuners.sara.selection import budget_to_count, threshold_for_count

    tensors = sara_default_tensors(unet)
    total = sum(t.numel() for t in tensors.values())
    threshold = threshold_for_count(tensors.values(), budget_to_count(budget, total))
    masks = {}
    for tensor in tensors.values():
        mask = tensor.detach().abs() < threshold
        tensor.requires_grad_(True)
        tensor.register_hook(lambda grad, mask=mask: grad * mask)
        masks[tensor] = mask
    return masks


def drop_weight_gradients(unet) -> None:
    """The compute floor of training entries of every layer: each Linear/Conv weight (SaRA's
    default targets) gets its dense gradient computed in backward, then dropped at once."""
    unet.requires_grad_(False)
    for tensor in sara_default_tensors(unet).values():
        tensor.requires_grad_(True)
        tensor.register_post_accumulate_grad_hook(lambda param: setattr(param, "grad", None))


# --- the parent: run every mode, print and write the table -----------------------------------

def machine_description(args) -> str:
    import torch

    from difftune.machine import cpu_name

    cpu = cpu_name()
    memory = ""
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"{cpu}, {os.cpu_count()} cores{memory}, torch {torch.__version__}, "
            f"{args.threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}), "
            f"fp32, load average {os.getloadavg()[0]:.1f} at the start")


def plan(args) -> list[dict]:
    modes = args.modes or ["lora-r4", "weight-grads", "sara", "sara-no-rank", "sara-dense", "lora-budget",
                           "full"]
    batches = args.batch_sizes or ([1] if args.device == "cpu" else [1, 4, 8])
    resolution = args.resolution or (256 if args.device == "cpu" else 512)
    specs = []
    for batch in batches:
        for mode in modes:
            if mode in BUDGET_MODES:
                budgets = args.budgets
            elif mode == "sara-no-rank":
                budgets = [max(args.budgets)]
            else:
                budgets = [None]
            for budget in budgets:
                specs.append({"mode": mode, "budget": budget, "batch": batch, "resolution": resolution,
                              "device": args.device, "steps": args.steps, "threads": args.threads,
                              "unet": args.unet})
    return specs


def run_all(specs: list[dict], rounds: int = 1) -> list[dict]:
    """Every spec in its own process; with several rounds, each mode's fastest round."""
    best: dict[int, dict] = {}
    for _ in range(rounds):
        for position, result in enumerate(run_round(specs)):
            kept = best.get(position)
            faster = "error" not in result and (kept is None or "error" in kept
                                                 or result["seconds"] < kept["seconds"])
            if kept is None or faster:
                best[position] = result
    return [best[i] for i in range(len(specs))]


def run_round(specs: list[dict]) -> list[dict]:
    from tqdm.auto import tqdm

    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # idle OpenMP threads sleep instead of spinning: on a shared CPU this halves wall time
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for spec in tqdm(specs, desc="modes", unit="process"):
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            tqdm.write(f"{spec['mode']} {spec['budget']}: failed\n{done.stderr[-2000:]}")
            results.append({**spec, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        results.append(json.loads(lines[-1]))
        tqdm.write(f"{spec['mode']} budget={spec['budget']} batch={spec['batch']}: "
                   f"{results[-1]['peak_gib']:.2f} GiB, {results[-1]['seconds']:.2f} s/step")
    return results


def table(results: list[dict], args, machine: str) -> str:
    memory_name = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    lines = [f"| mode | budget | batch | trainable | {memory_name} (GiB) | × LoRA r4 | s/step | × LoRA r4 "
             "| CPU s/step | × LoRA r4 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        reference = next((r for r in results if r["mode"] == "lora-r4" and r["batch"] == row["batch"]
                          and "error" not in r), None)
        budget = f"{row['budget'] / 1e6:g}M" if row.get("budget") else "–"
        if "error" in row:
            lines.append(f"| {LABELS[row['mode']]} | {budget} | {row['batch']} | – | failed: "
                         f"{row['error'][:60]} | | | | | |")
            continue

        def ratio(key: str, row=row, reference=reference) -> str:
            return f"{row[key] / reference[key]:.2f}" if reference else "–"

        lines.append(f"| {LABELS[row['mode']]} | {budget} | {row['batch']} | {row['trainable'] / 1e6:.2f}M "
                     f"| {row['peak_gib']:.2f} | {ratio('peak_gib')} | {row['seconds']:.2f} "
                     f"| {ratio('seconds')} | {row['cpu_seconds']:.2f} | {ratio('cpu_seconds')} |")
    resolution = args.resolution or (256 if args.device == "cpu" else 512)
    model = "SD 1.5-size UNet built from config" if args.unet == "sd15" else "tiny test UNet"
    rounds = f", fastest of {args.rounds} alternating rounds" if args.rounds > 1 else ""
    header = (f"Machine: {machine}. {model} (random weights), "
              f"{resolution} px ({resolution // 8}×{resolution // 8} latents), one training step "
              f"(forward, backward, clip 1.0, AdamW) repeated {args.steps}× after a warm-up, median "
              f"time{rounds}; every mode in its own process. CPU s/step is the process's CPU "
              "time (all threads): on a shared machine it is steadier than wall time. SaRA "
              "selects by budget over every Linear/Conv weight; its default λ_rank = 5e-3 draws one "
              "eligible matrix per step for the "
              "nuclear-norm subgradient (an eigen-decomposition, the 'λ_rank = 0' row shows its cost).")
    return header + "\n\n" + "\n".join(lines) + "\n"


def bar_chart(results: list[dict], path: Path) -> None:
    """Peak memory and step time per mode, drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    rows = [r for r in results if "error" not in r]
    if not rows:
        return
    width, bar_h, gap, left = 1100, 16, 10, 330
    height = 60 + len(rows) * (2 * bar_h + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "peak memory (GiB, blue) and seconds per step (orange)", fill="black")
    top_mem = max(r["peak_gib"] for r in rows)
    top_time = max(r["seconds"] for r in rows)
    y = 40
    for r in rows:
        label = LABELS[r["mode"]] + (f" {r['budget'] / 1e6:g}M" if r.get("budget") else "")
        draw.text((10, y + bar_h // 2), f"{label} (b{r['batch']})", fill="black")
        span = width - left - 90
        draw.rectangle([left, y, left + span * r["peak_gib"] / top_mem, y + bar_h - 2], fill=(60, 110, 200))
        draw.text((left + span * r["peak_gib"] / top_mem + 5, y), f"{r['peak_gib']:.2f}", fill="black")
        y += bar_h
        draw.rectangle([left, y, left + span * r["seconds"] / top_time, y + bar_h - 2], fill=(230, 140, 40))
        draw.text((left + span * r["seconds"] / top_time + 5, y), f"{r['seconds']:.2f}", fill="black")
        y += bar_h + gap
    image.save(path)


def write_section(docs: Path, device: str, text: str) -> None:
    """Replace this device's subsection of the SaRA section (the other one is kept)."""
    content = docs.read_text()
    start = content.index(SECTION)
    following = content.find("\n## ", start + len(SECTION))
    end = len(content) if following < 0 else following + 1
    parts = {"cpu": NOT_MEASURED["cpu"], "cuda": NOT_MEASURED["cuda"]}
    body = content[start + len(SECTION):end]
    for device_name, heading in SUBSECTIONS.items():
        found = re.search(rf"{re.escape(heading)}\n(.*?)(?=\n### |\Z)", body, flags=re.S)
        if found:
            parts[device_name] = found.group(1).strip() + "\n"
    parts[device] = text
    section = SECTION + "\n\n" + "\n".join(f"{SUBSECTIONS[d]}\n\n{parts[d]}" for d in SUBSECTIONS)
    docs.write_text(content[:start] + section + ("\n" if following >= 0 else "") + content[end:])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    machine = machine_description(args)
    results = run_all(plan(args), args.rounds)
    text = table(results, args, machine)
    print(text)
    if str(args.docs):
        chart = args.docs.parent / f"benchmark_sara_memory_{args.device}.png"
        bar_chart(results, chart)
        command = "python benchmarks/memory_sara.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = f"Command: `{command.strip()}`\n\n{text}\n![chart]({chart.name})\n"
        write_section(args.docs, args.device, body)
        print(f"wrote {args.docs} and {chart}")


if __name__ == "__main__":
    main()
