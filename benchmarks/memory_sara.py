"""Memory and step time of SaRA against its peers, LoRA and full fine-tuning, at SD 1.5 size.

Builds the SD 1.5 UNet from its config (random weights, no download) and repeats one
training step (forward, backward, clip to 1.0, AdamW step) in each mode, every mode in
its own process so that peak memory is its own; with ``--rounds`` the modes run in
alternation (interleaved), each keeping its fastest round. ``--layers`` says which
layers the budget modes train: ``linear`` (every Linear of the UNet) or ``all`` (every
Linear and Conv2d); each given set gets its own rows.

- ``lora-r4``: peft LoRA rank 4 on the attention projections (the reference, ratio 1);
- ``weight-grads``: the dense-gradient floor: every targeted weight's gradient computed
  in backward and dropped at once, no optimizer;
- ``sara``: difftune's SaRA, default options (sampled weight gradients where measured
  faster, ``weight_gradients=auto``), selection by budget; ``sara-no-rank``: the same with
  lambda_rank 0 (no SVD); ``sara-dense-grads``: the same with ``weight_gradients=dense``
  (each layer's whole weight gradient, then gathered: the earlier path);
- ``sara-dense``: SaRA without the hook: the targeted weights are trained densely with
  their gradients masked (dense gradients, dense AdamW state, one byte per weight of mask);
- ``supertuning``: peft Super-Tuning (``peft.SupertuningConfig``), smallest-magnitude
  entries (``select_top=False``), the budget as a per-layer fraction; Linear layers only;
- ``shira``: peft SHiRA (``peft.ShiraConfig``, random masks), r·(in+out) entries per layer
  with r for the budget; Linear layers only;
- ``official-sara``: the SaRA authors' optimizer (``optim/adamw.py``) from a local copy
  given with ``--official_sara DIR``; it is never downloaded, and the mode is skipped
  without it. It takes every parameter of the layers it is given (biases too), θ from
  the budget;
- ``lora-budget``: peft LoRA on the same layers with the rank that gives the budget;
- ``full``: full fine-tuning.

CPU: peak RSS (``ru_maxrss``) at 256 px, batch 1. GPU (``--device cuda``):
``torch.cuda.max_memory_allocated`` at 512 px, batches 1/4/8. The table goes to stdout
and into its section of docs/benchmarks.md, a bar chart next to it. Run it alone on the machine
(full fine-tuning needs about 14 GiB).

    python benchmarks/memory_sara.py --rounds 2             # CPU: the peers table of docs/benchmarks.md
    python benchmarks/memory_sara.py --official_sara ~/src/SaRA --rounds 2
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
SECTION = "## Memory and speed: SaRA, its peers, LoRA, full fine-tuning"
SUBSECTIONS = {"cpu": "### CPU: peak RSS, 256 px, batch 1", "cuda": "### GPU: max_memory_allocated, 512 px"}
NOT_MEASURED = {"cpu": "not measured yet\n", "cuda": "not measured: no GPU available\n"}
BUDGET_MODES = ("sara", "sara-no-rank", "sara-measured", "sara-dense-grads", "sara-dense", "lora-budget",
                "supertuning", "shira", "official-sara")
LINEAR_ONLY = ("supertuning", "shira")  # peft implements these for Linear layers only
LABELS = {
    "lora-r4": "peft LoRA r4, attention",
    "sara": "**difftune SaRA** (sampled weight gradients, auto)",
    "sara-no-rank": "difftune SaRA, λ_rank = 0",
    "sara-measured": "difftune SaRA, routes measured (weight_gradients=measure)",
    "sara-dense-grads": "difftune SaRA, dense weight gradients",
    "sara-dense": "SaRA dense-masked (no hook)",
    "lora-budget": "peft LoRA, same layers, rank for the budget",
    "supertuning": "peft Super-Tuning, smallest magnitudes",
    "shira": "peft SHiRA (random masks)",
    "official-sara": "official SaRA code",
    "full": "full fine-tuning",
    "weight-grads": "dense weight gradients only (the floor)",
}
DEFAULT_MODES = {
    "linear": ["lora-r4", "lora-budget", "weight-grads", "sara", "sara-no-rank", "sara-measured",
               "sara-dense-grads", "supertuning", "shira", "official-sara"],
    "all": ["weight-grads", "sara", "sara-dense-grads", "official-sara"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[5e6, 2e7],
                        help="trained entries per budget mode (the 'all' layer set takes the largest)")
    parser.add_argument("--layers", nargs="+", default=["linear", "all"], choices=["linear", "all"],
                        help="layer sets the budget modes train: every Linear, or every Linear and Conv2d")
    parser.add_argument("--official_sara", type=Path, default=None,
                        help="a local copy of the SaRA authors' repository (its optim/adamw.py is run); "
                             "without it the official-sara mode is skipped")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                        help="default: 1 on CPU, 1 4 8 on GPU")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 256 CPU, 512 GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every mode this many times, alternating, and keep its fastest "
                             "round (steadier ratios on a shared machine)")
    parser.add_argument("--modes", nargs="+", default=None, help="subset of modes to run")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"),
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
    layer_set = "linear" if spec.get("layers") == "linear" else "all"
    layers = layer_names(unet, layer_set)
    targets = "all" if layer_set == "all" else layers
    adapter, masks, official = None, {}, None
    if mode == "lora-r4":
        difftune.add_adapter(unet, "lora", targets="attn", rank=4)
        groups = [{"params": difftune.trainable_parameters(unet), "weight_decay": 1e-2}]
    elif mode == "lora-budget":
        difftune.add_adapter(unet, "lora", targets=targets, rank=lora_rank_for(unet, budget, layers))
        groups = [{"params": difftune.trainable_parameters(unet), "weight_decay": 1e-2}]
    elif mode in ("sara", "sara-no-rank", "sara-measured", "sara-dense-grads"):
        options = {"lambda_rank": 0.0} if mode == "sara-no-rank" else {}
        if mode in ("sara-dense-grads", "sara-measured"):
            options["weight_gradients"] = "dense" if mode == "sara-dense-grads" else "measure"
        adapter = difftune.add_adapter(unet, "sara", targets=targets, budget=budget, **options)
        groups = adapter.optimizer_parameter_groups(1e-2)
    elif mode == "sara-dense":
        masks = dense_masks(unet, budget, layers)
        groups = [{"params": list(masks), "weight_decay": 0.0}]
    elif mode in ("supertuning", "shira"):
        groups = [{"params": peft_sparse_parameters(unet, mode, budget, layers), "weight_decay": 1e-2}]
    elif mode == "official-sara":
        official = official_sara_optimizer(unet, budget, layers, Path(spec["official_sara"]))
        groups = []
    elif mode == "full":
        groups = [{"params": list(unet.parameters()), "weight_decay": 1e-2}]
    elif mode == "weight-grads":
        drop_weight_gradients(unet, layers)
        groups = []
    else:
        raise SystemExit(f"unknown mode {mode}")
    params = [p for g in groups for p in g["params"]]
    if masks:
        trainable = sum(m.sum().item() for m in masks.values())
    elif official is not None:
        params = [p for g in official.param_groups for p in g["params"]]
        trainable = sum(p.numel() for p in params)
    else:
        trainable = sum(p.numel() for p in params)
    optimizer = official or (torch.optim.AdamW(groups, lr=1e-4) if groups else None)

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
    result = {"mode": mode, "budget": budget, "layers": spec.get("layers", "all"), "batch": batch,
              "trainable": int(trainable),
              "seconds": statistics.median(times[1:]), "all_seconds": times,
              "cpu_seconds": statistics.median(cpu_times[1:])}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if adapter is not None:
        routes = adapter.sparse.weight_gradient_routes()
        result["routes"] = [{**row, "shape": list(row["shape"])} for row in routes]
    return result


def layer_names(unet, layers: str) -> list[str]:
    """Names of the layers a budget mode trains: every Linear, or every Linear and Conv2d."""
    from torch import nn

    kinds = (nn.Linear,) if layers == "linear" else (nn.Linear, nn.Conv2d)
    return [name for name, module in unet.named_modules() if type(module) in kinds]


def peft_sparse_parameters(unet, mode: str, budget: float, layers: list[str]) -> list:
    """peft's Super-Tuning (smallest magnitudes, the budget's fraction of every layer) or SHiRA
    (r·(in+out) random entries per layer, r for the budget) on the Linear layers of ``layers``."""
    import peft
    from torch import nn

    linear = [name for name in layers if isinstance(unet.get_submodule(name), nn.Linear)]
    modules = [unet.get_submodule(name) for name in linear]
    if mode == "supertuning":
        total = sum(m.weight.numel() for m in modules)
        config = peft.SupertuningConfig(target_modules=linear, sparsity=1.0 - budget / total,
                                        select_top=False)
    else:
        per_rank = sum(m.in_features + m.out_features for m in modules)
        config = peft.ShiraConfig(target_modules=linear, r=max(1, round(budget / per_rank)), random_seed=0)
    unet.requires_grad_(False)
    peft.inject_adapter_in_model(config, unet)
    return [p for p in unet.parameters() if p.requires_grad]


def official_sara_optimizer(unet, budget: float, layers: list[str], source: Path):
    """The SaRA authors' optimizer from a local copy of their repository, on ``layers``.

    It trains the entries |p| < θ of every parameter of the model it is given (weights and
    biases); it is given a container of the chosen layers (the UNet's own modules), θ from
    the budget over those parameters. Progressive adjustment is set past the run (with it off
    the official optimizer fails on its first step)."""
    from torch import nn

    from difftune.tuners.sara.selection import threshold_for_count

    if not (source / "optim" / "adamw.py").is_file():
        raise SystemExit(f"--official_sara {source}: no optim/adamw.py there (a copy of the SaRA repository)")
    sys.path.insert(0, str(source))
    import optim.adamw as official

    container = nn.ModuleList([unet.get_submodule(name) for name in layers])
    threshold = threshold_for_count(list(container.parameters()), int(budget))
    return official.AdamW(container, lr=1e-4, threshold=threshold, progressive_iter=10**9, lambda_rank=0,
                          weight_decay=1e-2)


def lora_rank_for(unet, budget: float, layers: list[str]) -> int:
    """The LoRA rank whose parameter count on ``layers`` is closest to the budget."""
    from torch import nn

    per_rank = 0
    for module in (unet.get_submodule(name) for name in layers):
        if isinstance(module, nn.Linear):
            per_rank += module.in_features + module.out_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_rank += module.in_channels * kh * kw + module.out_channels
    return max(1, round(budget / per_rank))


def sara_default_tensors(unet, layers: list[str] | None = None) -> dict:
    """The tensors SaRA selects from by default: the layers' weights (every Linear/Conv), no
    biases or norms."""
    from difftune.targeting import resolve_targets
    from difftune.tuners.sara.selection import targeted_tensors

    modules = resolve_targets(unet, layers or "all")
    return targeted_tensors(unet, modules, include_bias_norm=False)


def dense_masks(unet, budget: float, layers: list[str] | None = None) -> dict:
    """SaRA without the hook: train whole weights, mask their gradients (bool per weight)."""
    from difftune.tuners.sara.selection import budget_to_count, threshold_for_count

    tensors = sara_default_tensors(unet, layers)
    total = sum(t.numel() for t in tensors.values())
    threshold = threshold_for_count(tensors.values(), budget_to_count(budget, total))
    masks = {}
    for tensor in tensors.values():
        mask = tensor.detach().abs() < threshold
        tensor.requires_grad_(True)
        tensor.register_hook(lambda grad, mask=mask: grad * mask)
        masks[tensor] = mask
    return masks


def drop_weight_gradients(unet, layers: list[str] | None = None) -> None:
    """The compute floor of training entries of every layer: each targeted weight (default:
    every Linear/Conv) gets its dense gradient computed in backward, then dropped at once."""
    unet.requires_grad_(False)
    for tensor in sara_default_tensors(unet, layers).values():
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
            "fp32")


def plan(args) -> list[dict]:
    """One spec per (layer set, mode, budget), in the order the table shows them."""
    batches = args.batch_sizes or ([1] if args.device == "cpu" else [1, 4, 8])
    resolution = args.resolution or (256 if args.device == "cpu" else 512)
    specs, seen = [], set()
    for batch in batches:
        for layers in args.layers:
            for mode in args.modes or DEFAULT_MODES[layers]:
                if mode == "official-sara" and args.official_sara is None:
                    continue
                if mode in LINEAR_ONLY and layers != "linear":
                    continue
                # lora-r4 and full do not depend on the layer set
                layers_of_row = layers if mode in BUDGET_MODES or mode == "weight-grads" else "–"
                if mode in ("sara-no-rank", "sara-measured"):
                    budgets = [min(args.budgets)]
                elif mode in BUDGET_MODES:
                    budgets = args.budgets if layers == "linear" else [max(args.budgets)]
                else:
                    budgets = [None]
                for budget in budgets:
                    key = (batch, layers_of_row, mode, budget)
                    if key in seen:
                        continue
                    seen.add(key)
                    specs.append({"mode": mode, "budget": budget, "layers": layers_of_row, "batch": batch,
                                  "resolution": resolution, "device": args.device, "steps": args.steps,
                                  "threads": args.threads, "unet": args.unet,
                                  "official_sara": str(args.official_sara) if args.official_sara else None})
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


def _reference(results: list[dict], row: dict, mode: str, same_budget: bool) -> dict | None:
    for other in results:
        if (other["mode"] == mode and other["batch"] == row["batch"] and "error" not in other
                and (not same_budget or (other.get("layers") == row.get("layers")
                                          and other.get("budget") == row.get("budget")))):
            return other
    return None


def table(results: list[dict], args, machine: str, load: tuple[str, str] = ("?", "?")) -> str:
    """The markdown table; time ratios are of process CPU time, against LoRA at the same count on
    the same layers, and against the floor (dense weight gradients) of the same layers."""
    memory_name = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    lines = [f"| configuration | layers | budget | batch | trainable | {memory_name} (GiB) | s/step "
             "| CPU s/step | × LoRA same count | × floor | × LoRA r4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        budget = f"{row['budget'] / 1e6:g}M" if row.get("budget") else "–"
        label = LABELS[row["mode"]]
        if "error" in row:
            lines.append(f"| {label} | {row.get('layers', '–')} | {budget} | {row['batch']} | – | failed: "
                         f"{row['error'][:60]} | | | | | |")
            continue
        floor = next((r for r in results if r["mode"] == "weight-grads" and "error" not in r
                      and r.get("layers") == row.get("layers") and r["batch"] == row["batch"]), None)
        references = (_reference(results, row, "lora-budget", True), floor,
                      _reference(results, row, "lora-r4", False))
        ratios = [f"{row['cpu_seconds'] / ref['cpu_seconds']:.2f}" if ref else "–" for ref in references]
        lines.append(f"| {label} | {row.get('layers', '–')} | {budget} | {row['batch']} "
                     f"| {row['trainable'] / 1e6:.2f}M | {row['peak_gib']:.2f} | {row['seconds']:.2f} "
                     f"| {row['cpu_seconds']:.2f} | " + " | ".join(ratios) + " |")
    resolution = args.resolution or (256 if args.device == "cpu" else 512)
    model = "SD 1.5-size UNet built from config" if args.unet == "sd15" else "tiny test UNet"
    rounds = f", fastest of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    header = (f"Machine: {machine}; load average (1/5/15 min) {load[0]} before, {load[1]} after. "
              f"{model} (random weights), "
              f"{resolution} px ({resolution // 8}×{resolution // 8} latents), one training step "
              f"(forward, backward, clip 1.0, AdamW) repeated {args.steps}× after a warm-up, median "
              f"time{rounds}; every configuration in its own process. CPU s/step is the process's CPU "
              "time (all threads): on a shared machine it is steadier than wall time, and the ratios use "
              "it. Layers 'linear': every Linear of the UNet; 'all': every Linear and Conv2d. "
              "SaRA's default λ_rank = 5e-3 draws one eligible matrix per step for the nuclear-norm "
              "subgradient (an eigen-decomposition; the 'λ_rank = 0' row shows its cost).")
    return header + "\n\n" + "\n".join(lines) + "\n"


def routes_table(results: list[dict]) -> str:
    """Per layer shape, for the first SaRA row with modelled routes (auto) and the first with measured
    ones: density, route and the two times behind the choice."""
    rows = [next((r for r in results if r.get("routes") and r["mode"] == mode), None)
            for mode in ("sara", "sara-measured")]
    return "\n".join(_routes_table(row) for row in rows if row is not None)


def _routes_table(row: dict) -> str:
    groups: dict[tuple, dict] = {}
    for route in row["routes"]:
        key = (tuple(route["shape"]), route["rows"], route["path"])
        group = groups.setdefault(key, {"count": 0, "densities": [], "dense_s": [], "sampled_s": []})
        group["count"] += 1
        group["densities"].append(route["density"])
        for name in ("dense_s", "sampled_s"):
            if route[name] is not None:
                group[name].append(route[name])
    how = ("times measured once per shape, rows and density" if row["mode"] == "sara-measured"
           else "times from the cost model")
    lines = [f"Weight-gradient route per layer shape, {LABELS[row['mode']]}, {row.get('layers')} layers, "
             f"{row['budget'] / 1e6:g}M ({how}):", "",
             "| weight shape | rows N | layers | density | route | dense ms | sampled ms |",
             "|---|---|---|---|---|---|---|"]
    for (shape, rows, path), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        dens = g["densities"]
        span = f"{min(dens):.2%}" if max(dens) - min(dens) < 1e-4 else f"{min(dens):.2%}–{max(dens):.2%}"
        timing = [f"{min(g[k]) * 1e3:.2f}" if g[k] else "–" for k in ("dense_s", "sampled_s")]
        lines.append(f"| {'×'.join(map(str, shape))} | {rows} | {g['count']} | {span} | {path} | "
                     + " | ".join(timing) + " |")
    sampled = sum(g["count"] for (_, _, path), g in groups.items() if path == "sampled")
    total = sum(g["count"] for g in groups.values())
    lines += ["", f"Sampled on {sampled} of {total} layers."]
    return "\n".join(lines) + "\n"


def bar_chart(results: list[dict], path: Path) -> None:
    """Peak memory and step time per mode, drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    rows = [r for r in results if "error" not in r]
    if not rows:
        return
    width, bar_h, gap, left = 1200, 16, 10, 430
    height = 60 + len(rows) * (2 * bar_h + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "peak memory (GiB, blue) and process CPU seconds per step (orange)", fill="black")
    top_mem = max(r["peak_gib"] for r in rows)
    top_time = max(r["cpu_seconds"] for r in rows)
    y = 40
    for r in rows:
        label = LABELS[r["mode"]].replace("*", "").replace("λ", "lambda")
        label += f" {r['budget'] / 1e6:g}M" if r.get("budget") else ""
        if r.get("layers") not in (None, "–"):
            label += f" [{r['layers']}]"
        draw.text((10, y + bar_h // 2), f"{label} (b{r['batch']})", fill="black")
        span = width - left - 90
        draw.rectangle([left, y, left + span * r["peak_gib"] / top_mem, y + bar_h - 2], fill=(60, 110, 200))
        draw.text((left + span * r["peak_gib"] / top_mem + 5, y), f"{r['peak_gib']:.2f}", fill="black")
        y += bar_h
        end = left + span * r["cpu_seconds"] / top_time
        draw.rectangle([left, y, end, y + bar_h - 2], fill=(230, 140, 40))
        draw.text((end + 5, y), f"{r['cpu_seconds']:.2f}", fill="black")
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
    before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    results = run_all(plan(args), args.rounds)
    after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    text = table(results, args, machine, (" ".join(before), " ".join(after)))
    routes = routes_table(results)
    if routes:
        text += "\n" + routes
    print(text)
    if args.docs:
        args.docs = Path(args.docs)
        chart = args.docs.parent / "images" / f"benchmark_sara_memory_{args.device}.png"
        chart.parent.mkdir(parents=True, exist_ok=True)
        bar_chart(results, chart)
        command = "python benchmarks/memory_sara.py " + " ".join(argv if argv is not None else sys.argv[1:])
        link = chart.relative_to(args.docs.parent).as_posix()
        body = f"Command: `{command.strip()}`\n\n{text}\n![chart]({link})\n"
        write_section(args.docs, args.device, body)
        print(f"wrote {args.docs} and {chart}")


if __name__ == "__main__":
    main()
