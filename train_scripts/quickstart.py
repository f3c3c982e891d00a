"""Quick start: attach an adapter, fit one image for a few steps, save, reload, compare.

A small, offline demonstration of the adapter API on a built-in pipeline. The full
subject-driven trainer is train_scripts/train_subject.py.

    python train_scripts/quickstart.py --output_dir outputs/quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import difftune
from difftune.errors import run_main
from difftune.model_factory import load_pipeline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrained_model_name_or_path", default="builtin:tiny-sd",
                        help="built-in name, hub id or local pipeline folder")
    parser.add_argument("--adapter", default="lora", choices=sorted(difftune.METHODS))
    parser.add_argument("--targets", default="attn", help="target preset or regex")
    parser.add_argument("--prompt", default="a photo of sks toy")
    parser.add_argument("--max_train_steps", type=int, default=60)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, required=True)
    return parser.parse_args()


def target_image(resolution: int) -> torch.Tensor:
    """A simple two-colour pattern in [-1, 1], the thing to fit."""
    y, x = np.mgrid[0:resolution, 0:resolution] / resolution
    rgb = np.stack([(x > 0.5) * 1.0, (y > 0.5) * 1.0, 0.5 * np.ones_like(x)], axis=0)
    return torch.tensor(rgb * 2 - 1, dtype=torch.float32)[None]


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    with torch.no_grad():
        latents = vae.encode(target_image(args.resolution)).latent_dist.mode() * vae.config.scaling_factor
        text = pipe.encode_prompt(args.prompt, "cpu", 1, False)[0]

    difftune.add_adapter(unet, args.adapter, targets=args.targets)
    params = difftune.trainable_parameters(unet)
    print(f"{args.adapter} on {args.targets}: {sum(p.numel() for p in params):,} trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    progress = tqdm(range(args.max_train_steps), desc="train")
    for _ in progress:
        noise = torch.randn_like(latents)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (1,))
        prediction = unet(pipe.scheduler.add_noise(latents, noise, t), t, text).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    path = difftune.save_adapter(unet, args.output_dir)
    base = load_pipeline(args.pretrained_model_name_or_path)
    tuned = load_pipeline(args.pretrained_model_name_or_path)
    difftune.load_adapter(tuned, path)
    images = []
    for pipeline in (base, tuned):
        generator = torch.Generator().manual_seed(args.seed)
        pipeline.set_progress_bar_config(disable=True)
        images.append(pipeline(args.prompt, num_inference_steps=20, height=args.resolution,
                               width=args.resolution, generator=generator).images[0])
    grid = Image.new("RGB", (2 * args.resolution, args.resolution))
    for i, image in enumerate(images):
        grid.paste(image, (i * args.resolution, 0))
    grid.save(args.output_dir / "before_after.png")
    print(f"adapter: {path}\nbefore | after: {args.output_dir / 'before_after.png'}")


if __name__ == "__main__":
    run_main(main)
