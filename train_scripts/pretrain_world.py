"""Pretrain the embedded model from scratch: world CLIP → VAE → UNet → StableDiffusionPipeline.

Stages: clip (both towers), clip_image (image side, text tower locked), vae (joint),
vae_decoder (decoder alone on the frozen encoder's latents), unet.

    python train_scripts/pretrain_world.py --output_dir outputs/pretrain_world --num_threads 1
    # interrupted? the same command with --resume continues every stage where it stopped

The assembled pipeline (fp16 safetensors) and the world CLIP are written to --model_dir
(default: assets/embedded_model). Checkpoints, the rendered training scenes and logs
stay in --output_dir.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from difftune.errors import run_main
from difftune.model_factory import EMBEDDED_MODEL_DIR
from difftune.world.pretrain import STAGES, PretrainConfig, pretrain_all, with_steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True, help="checkpoints, data cache and logs")
    parser.add_argument("--model_dir", type=Path, default=EMBEDDED_MODEL_DIR,
                        help="where the assembled pipeline is saved (default: assets/embedded_model)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated subset of clip,clip_image,vae,vae_decoder,unet; "
                             "skipped stages that others need must be finished")
    defaults = PretrainConfig()  # the help states the config's own defaults, never a copy of them

    def steps_help(stage: str, what: str = "") -> str:
        settings = getattr(defaults, stage)
        return f"{what}{', ' if what else ''}default {settings.steps} (batch {settings.batch_size})"

    parser.add_argument("--clip_steps", type=int, help=steps_help("clip", "joint CLIP steps"))
    parser.add_argument("--clip_image_steps", type=int,
                        help=steps_help("clip_image", "image-side CLIP steps with the text tower locked"))
    parser.add_argument("--vae_steps", type=int, help=steps_help("vae", "joint VAE steps"))
    parser.add_argument("--vae_decoder_steps", type=int,
                        help=steps_help("vae_decoder", "decoder-only steps on the frozen encoder's latents"))
    parser.add_argument("--unet_steps", type=int, help=steps_help("unet"))
    parser.add_argument("--train_scenes", type=int,
                        help=f"rendered training scenes (default {defaults.train_scenes})")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --output_dir")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps: a smoke test")
    args = parser.parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stages: unknown or empty {unknown or stages}; choose from {','.join(STAGES)}")
    args.stages = stages
    for flag in ("clip_steps", "clip_image_steps", "vae_steps", "vae_decoder_steps", "unet_steps",
                 "train_scenes", "num_threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be a positive integer, got {value}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = PretrainConfig.tiny() if args.tiny else PretrainConfig()
    config = with_steps(config, clip=args.clip_steps, clip_image=args.clip_image_steps,
                        vae=args.vae_steps, vae_decoder=args.vae_decoder_steps, unet=args.unet_steps)
    if args.train_scenes:
        config.train_scenes = args.train_scenes

    started = time.time()
    records = pretrain_all(args.output_dir, config, args.stages, args.device, args.resume,
                           model_dir=args.model_dir)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device}
    summary = {"command": " ".join(sys.argv), "machine": machine,
               "this_call_wall_seconds": round(time.time() - started, 1),
               "stages": {name: {"steps": r["step"], "wall_seconds": round(r["wall_seconds"], 1)}
                          for name, r in records.items()}}
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_main(main)
