"""Training speed of the embedded model's UNet and cheaper variants, as a table.

    python benchmarks/world_unet_speed.py --threads 2

The UNet stage is most of the embedded model's pretraining time, so this is where a
cheaper recipe has to come from. Each row times full optimizer steps (forward, ε loss,
backward, AdamW) of ``build_world_unet`` at the recipe's batch size on random latents and
text states of the recipe's shapes, in this one process, one after the other. Speed only:
whether a variant learns shapes as well is a pretraining run, not this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from difftune.errors import run_main
from difftune.world.clip_model import MAX_PROMPT_TOKENS
from difftune.world.pretrain import PretrainConfig, build_world_unet

# (block channels, attention heads); the first row is the shipped UNet. diffusers' UNet
# calls the head count ``attention_head_dim`` (a legacy name): 8 heads of 64 channels are
# 8 channels wide, which is slow on a CPU.
VARIANTS: list[tuple[tuple[int, ...], int]] = [
    ((64, 128, 128), 8),
    ((64, 128, 128), 2),
    ((32, 64, 128), 8),
    ((32, 64, 128), 2),
    ((32, 64, 64), 2),
]


def steps_per_second(unet: torch.nn.Module, config: PretrainConfig, batch_size: int, steps: int,
                     warmup: int) -> float:
    """Median rate over ``steps`` timed optimizer steps after ``warmup`` untimed ones."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet.learning_rate)
    size = int(unet.config.sample_size)
    latents = torch.randn(batch_size, config.latent_channels, size, size)
    text = torch.randn(batch_size, MAX_PROMPT_TOKENS, config.clip_size.text_width)
    timesteps = torch.randint(0, 1000, (batch_size,))
    noise = torch.randn_like(latents)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(latents, timesteps, text).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return 1.0 / statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the recipe's UNet batch")
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be a positive integer, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped = PretrainConfig()
    batch_size = args.batch_size or shipped.unet.batch_size
    rows = []
    for channels, heads in VARIANTS:
        config = replace(shipped, unet_channels=channels, unet_attention_heads=heads)
        unet = build_world_unet(config, config.clip_size.text_width)
        rows.append({"channels": channels, "heads": heads,
                     "parameters": sum(p.numel() for p in unet.parameters()),
                     "steps_per_s": steps_per_second(unet, config, batch_size, args.steps, args.warmup)})
    base = rows[0]["steps_per_s"]
    print(f"UNet training steps, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| channels | heads | parameters | steps/s | × shipped | minutes per 1000 steps |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        rate = row["steps_per_s"]
        print(f"| {'/'.join(map(str, row['channels']))} | {row['heads']} | {row['parameters'] / 1e6:.2f}M | "
              f"{rate:.2f} | {rate / base:.2f} | {1000 / rate / 60:.1f} |")
    return rows


if __name__ == "__main__":
    run_main(main)
