"""Estimated training memory of each method on a real model's denoiser, from its config alone (meta device):
what the GPU holds while the subject trainer trains at a resolution, with gradient checkpointing, the
prompts encoded beforehand and the text encoders freed, the latents cached and the VAE off the device.

    difftune memory --model qwen-image-config            # the default rows, 1024 px
    difftune memory --model flux2-dev-config --resolution 768 --targets attn-ff

(``python -m difftune.memory`` runs the same.)

Each row adds:

* **base weights**: every denoiser parameter at 2 bytes (bf16), or 1 / 0.5 bytes for LoRA-type methods on a
  base quantised to 8 / 4 bits (``base_bits``; quantisation keeps its per-block scales, not counted);
* **adapter buffers**: what a method keeps beside the base besides its trainable values: SVFit's U_r and
  V_r (bf16, r·(out + in) per layer), SaRA's int32 index of its entries;
* **trainable state**: each trainable value as an fp32 master with its fp32 gradient and AdamW's two fp32
  moments, 16 bytes;
* **activations** (batch 1, bf16): with every block checkpointed, each block's input (tokens × width) is
  kept, and the block being recomputed holds every Linear output of one block (tokens × out features,
  summed) plus its attention output; tokens are the image's latent tokens at ``resolution`` and
  ``text_tokens`` prompt tokens.

It is an estimate for choosing a card, not a measurement: CUDA's allocator, the attention kernel's
workspace and a quantised base's scales come on top (leave a few GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import DifftuneError, run_main

GIB = 2**30
TRAINABLE_BYTES = 16  # fp32 value, gradient and AdamW's two moments

# (label, method, options, base bits): LoRA on a bf16 and a 4-bit base, the other methods on bf16 (SaRA
# trains the base weights themselves; SVFit and TLoRA need them dense)
MEMORY_ROWS: list[tuple[str, str, dict[str, Any], int]] = [
    ("LoRA r=16", "lora", {"rank": 16}, 16),
    ("LoRA r=16, 4-bit base", "lora", {"rank": 16}, 4),
    ("SaRA, default θ's budget (5.8%)", "sara", {"budget": 0.0582}, 16),
    ("SVFit full rank", "svfit", {"rank": "full"}, 16),
    ("TLoRA TRM R=2 + TR R=6", "tlora", {"transform_rank": 2, "residual": "tr", "rank": 6}, 16),
]


@dataclasses.dataclass
class MemoryEstimate:
    label: str
    base_weights: int
    adapter_buffers: int
    trainable_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.base_weights + self.adapter_buffers + self.trainable_state + self.activations


def image_tokens(family: Any, config: Any, resolution: int, vae_scale_factor: int = 8) -> int:
    """Latent tokens of one square image: one per latent patch."""
    side = resolution // (vae_scale_factor * family.latent_patch(config))
    return side * side


def activation_bytes(denoiser: nn.Module, tokens: int, bytes_per_value: int = 2) -> int:
    """Checkpointed activations of one example (see the module docstring)."""
    blocks = [block for child in denoiser.children() if isinstance(child, nn.ModuleList) for block in child]
    if not blocks:
        raise DifftuneError(f"{type(denoiser).__name__} has no list of blocks to estimate activations by")
    widths = [next(m.in_features for m in block.modules() if isinstance(m, nn.Linear)) for block in blocks]
    inside = max(sum(m.out_features for m in block.modules() if isinstance(m, nn.Linear)) + width
                 for block, width in zip(blocks, widths, strict=True))
    return bytes_per_value * tokens * (sum(widths) + inside)


def estimate_memory(denoiser: nn.Module, family: Any, rows: Sequence[tuple[str, str, dict[str, Any], int]]
                    = MEMORY_ROWS, targets: str = "attn", resolution: int = 1024,
                    text_tokens: int = 512) -> list[MemoryEstimate]:
    """One `MemoryEstimate` per (label, method, options, base bits) row, on a meta-device ``denoiser``."""
    from .params import parameter_table
    from .targeting import resolve_targets
    from .tuners import get_method

    weights = sum(p.numel() for p in denoiser.parameters())
    tokens = image_tokens(family, denoiser.config, resolution) + text_tokens
    activations = activation_bytes(denoiser, tokens)
    layers = [m for m in resolve_targets(denoiser, targets).values() if isinstance(m, nn.Linear)]
    counts = {row.label: row.trainable for row in parameter_table(
        denoiser, [(label, method, options) for label, method, options, _ in rows], targets)}
    estimates = []
    for label, method, _, bits in rows:
        trainable = counts[label]
        if trainable is None:
            raise DifftuneError(f"{label}: {method} cannot be counted without the weights")
        buffers = get_method(method).frozen_buffer_bytes(layers, trainable)
        estimates.append(MemoryEstimate(label, weights * bits // 8, buffers, TRAINABLE_BYTES * trainable,
                                        activations))
    return estimates


def format_memory_table(estimates: Sequence[MemoryEstimate], title: str = "") -> str:
    header = "| configuration | base weights | adapter buffers | trainable + AdamW | activations | total |"
    lines = [f"{title}\n" if title else "", header, "|---|---|---|---|---|---|"]
    for e in estimates:
        cells = [e.base_weights, e.adapter_buffers, e.trainable_state, e.activations, e.total]
        lines.append(f"| {e.label} | " + " | ".join(f"{value / GIB:.1f} GiB" for value in cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    from .families import FAMILIES
    from .params import load_model, meta_models

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"a reference config: {', '.join(meta_models())}")
    parser.add_argument("--targets", default="attn", help="target preset, regex or module name")
    parser.add_argument("--resolution", type=int, default=1024, help="training resolution in pixels")
    parser.add_argument("--text_tokens", type=int, default=512, help="prompt tokens per example")
    args = parser.parse_args(argv)
    if args.model not in meta_models():
        raise DifftuneError(f"--model {args.model}: memory is estimated on a reference config "
                            f"({', '.join(meta_models())})")
    class_name = meta_models()[args.model][1]
    family = next(f for f in FAMILIES.values() if f.denoiser_class == class_name)
    estimates = estimate_memory(load_model(args.model), family, MEMORY_ROWS, args.targets, args.resolution,
                                args.text_tokens)
    title = (f"Estimated training memory on {args.model}, targets={args.targets}, {args.resolution} px, "
             "batch 1, gradient checkpointing")
    table = format_memory_table(estimates, title)
    print(table)
    return table


if __name__ == "__main__":
    run_main(main)
