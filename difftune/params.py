"""How many parameters each method trains on a given model: a table to choose a budget by.

    python -m difftune.params --model sd15-config            # SD 1.5 UNet, meta device
    python -m difftune.params --model sdxl-config --targets attn
    python -m difftune.params --model builtin:tiny-sd --row "svfit" --row "tlora:rank=4,residual=lora"
    python -m difftune.params --model flux-dev-config          # FLUX.1-dev transformer, meta device
    python -m difftune.params --model qwen-image-config        # also flux2-dev-config, flux2-klein-4b-config,
                                                               # flux2-klein-9b-config, z-image-config
    python -m difftune.params --model wan2.1-14b-config --targets attn-ff   # Wan 2.1 14B transformer

Each row attaches one adapter, counts `count_trainable_parameters`, and removes it again
(the model is restored exactly). ``sd15-config`` / ``sdxl-config`` / ``flux-dev-config`` build
the real architectures on the meta device (no memory, no download); methods whose size depends
on the weights (SVFit's energy rule, SaRA's threshold) need a real model and say so in their
row; a SaRA budget given as a count or fraction is counted without one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from torch import nn

from .api import (
    AdapterSpec,
    add_adapter,
    count_trainable_parameters,
    find_denoiser,
    has_adapter,
    remove_adapter,
)
from .errors import DifftuneError, run_main
from .families import FAMILIES
from .tuners import METHODS

# (label, method, options): the configurations of the papers' parameter-count tables.
DEFAULT_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("LoRA r=1", "lora", {"rank": 1}),
    ("LoRA r=4", "lora", {"rank": 4}),
    ("DoRA r=4", "lora", {"rank": 4, "use_dora": True}),
    ("SVFit energy 0.99", "svfit", {}),
    ("SVFit full rank", "svfit", {"rank": "full"}),
    ("TLoRA Kronecker + TR R=2", "tlora", {"transform_rank": 1, "residual": "tr", "rank": 2}),
    ("TLoRA TRM R=2 + TR R=6", "tlora", {"transform_rank": 2, "residual": "tr", "rank": 6}),
    ("TLoRA* TRM R=2 + LoRA r=4", "tlora", {"transform_rank": 2, "residual": "lora", "rank": 4}),
]

# FLUX.1-dev rows: LoRA at the ranks Flux LoRAs use, SaRA at the budget its default θ = 2e-3
# selects on SD 1.5 (about 50M of 860M weights, the paper's count: 5.8%), SVFit full rank and
# TLoRA TRM R=2 + TR R=6 (the paper's compact configuration).
SARA_DEFAULT_BUDGET = 50e6 / 859_520_964
FLUX_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("LoRA r=4", "lora", {"rank": 4}),
    ("LoRA r=16", "lora", {"rank": 16}),
    ("SaRA, default θ's budget (5.8%)", "sara", {"budget": round(SARA_DEFAULT_BUDGET, 4)}),
    ("SVFit full rank", "svfit", {"rank": "full"}),
    ("TLoRA TRM R=2 + TR R=6", "tlora", {"transform_rank": 2, "residual": "tr", "rank": 6}),
]

# default rows of a reference config (by its name) other than the papers' set: the large DiTs' (FLUX.1's)
DIT_CONFIGS = ("flux-dev-config", "flux2-dev-config", "flux2-klein-4b-config", "flux2-klein-9b-config",
               "qwen-image-config", "z-image-config", "wan2.1-1.3b-config", "wan2.1-14b-config",
               "wan2.2-a14b-expert-config")
REFERENCE_ROWS = dict.fromkeys(DIT_CONFIGS, FLUX_ROWS)


def meta_models() -> dict[str, tuple[dict[str, Any], str]]:
    """Every family's full-size reference configs: ``{name: (denoiser config, diffusers class)}``."""
    return {name: (config, family.denoiser_class) for family in FAMILIES.values()
            for name, config in family.reference_configs.items()}


@dataclasses.dataclass
class ParameterRow:
    label: str
    method: str
    options: dict[str, Any]
    trainable: int | None
    layers: int | None
    note: str = ""

    @property
    def millions(self) -> str:
        return "–" if self.trainable is None else f"{self.trainable / 1e6:.3f}M"


def parameter_table(model: Any, rows: Sequence[tuple[str, str, dict[str, Any]]] | None = None,
                    targets: str | list[str] = "attn") -> list[ParameterRow]:
    """Count the trainable parameters of each (label, method, options) on ``model``.

    ``model`` is a pipeline or a denoiser without an adapter; it is left unchanged. Rows of
    methods that are not registered are skipped; a row that cannot attach is reported with
    the reason instead of a count.
    """
    denoiser, _ = find_denoiser(model)
    if has_adapter(denoiser):
        raise DifftuneError("parameter_table needs a model without an adapter attached")
    results = []
    on_meta = any(p.is_meta for p in denoiser.parameters())
    for label, method, options in DEFAULT_ROWS if rows is None else rows:
        if method not in METHODS:
            continue
        try:
            if on_meta:  # a method that cannot attach without weights counts from the shapes
                spec = AdapterSpec(method, targets, options)
                modules = spec.check(denoiser)
                count = spec.adapter_class.weightless_parameter_count(denoiser, spec.config, modules)
                if count is not None:
                    results.append(ParameterRow(label, method, dict(options), count, len(modules)))
                    continue
            adapter = add_adapter(denoiser, method, targets=targets, **dict(options))
            layers = len(adapter.target_names)
            count = count_trainable_parameters(denoiser)
            remove_adapter(denoiser)
            results.append(ParameterRow(label, method, dict(options), count, layers))
        except DifftuneError as err:
            results.append(ParameterRow(label, method, dict(options), None, None, note=str(err)))
    return results


def format_parameter_table(rows: Sequence[ParameterRow], title: str = "") -> str:
    """A markdown table of `parameter_table` rows."""
    lines = [f"{title}\n" if title else "",
             "| configuration | method | options | layers | trainable | millions |",
             "|---|---|---|---|---|---|"]
    notes = []
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in row.options.items()) or "defaults"
        if row.trainable is None:
            notes.append(row.note)
            count = f"n/a ({len(notes)})"
        else:
            count = f"{row.trainable:,}"
        layers = "" if row.layers is None else str(row.layers)
        lines.append(f"| {row.label} | `{row.method}` | {options} | {layers} | {count} | {row.millions} |")
    if notes:
        lines.append("")
        lines.extend(f"({i}) {note}" for i, note in enumerate(notes, 1))
    return "\n".join(lines).lstrip("\n") + "\n"


def parse_row(text: str) -> tuple[str, str, dict[str, Any]]:
    """``method`` or ``method:key=value,key=value`` (values read as JSON when they parse)."""
    method, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise DifftuneError(f"--row {text!r}: expected key=value, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return text, method.strip(), options


def load_model(name: str) -> nn.Module:
    """A meta-device denoiser for the ``*-config`` names, else a pipeline's denoiser."""
    from . import model_factory

    if name in meta_models():
        config, class_name = meta_models()[name]
        return model_factory.build_denoiser_on_meta(config, class_name)
    return find_denoiser(model_factory.load_pipeline(name))[0]


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-config",
                        help=f"{', '.join(meta_models())} (meta device), or a built-in name, hub id "
                             "or pipeline folder as the trainer takes")
    parser.add_argument("--targets", default="attn", help="target preset, regex or module name")
    parser.add_argument("--row", action="append", default=None, metavar="METHOD[:k=v,...]",
                        help="a configuration to count (repeatable); default: the papers' set")
    args = parser.parse_args(argv)
    rows = REFERENCE_ROWS.get(args.model)
    rows = rows if args.row is None else [parse_row(r) for r in args.row]
    table = format_parameter_table(parameter_table(load_model(args.model), rows, args.targets),
                                   title=f"Trainable parameters on {args.model}, targets={args.targets}")
    print(table)
    return table


if __name__ == "__main__":
    run_main(main)
