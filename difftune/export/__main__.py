"""difftune export ADAPTER --format kohya [--rank R | --energy E] [--output PATH] [--base MODEL]

(``python -m difftune.export ...`` is the same command.)

Writes the export and ``<output>.report.json`` (and, for LoRA formats, ``<output>.compare.png``:
base model | adapter | export, same seeds), and prints the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import run_main
from . import DEFAULT_PROMPT, FORMATS, default_output, export_adapter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftune export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", nargs="+",
                        help="a difftune adapter file (or a folder holding adapter.safetensors); several: "
                             "the set of them as one file, ΔW = Σ wᵢ·ΔWᵢ (--weights)")
    parser.add_argument("--weights", type=float, nargs="+",
                        help="with several adapters, one weight each (default 1 each)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--output",
        help="file (folder for --format diffusers); default: beside the adapter, named after the format",
    )
    parser.add_argument(
        "--base",
        help="base model (built-in name, hub id or folder); default: the one named in the adapter's header",
    )
    parser.add_argument(
        "--rank", type=int, help="SVD extraction (non-LoRA methods, or to shrink a LoRA): rank of every layer"
    )
    parser.add_argument(
        "--energy",
        type=float,
        help="SVD extraction: per layer, the smallest rank keeping this fraction of ‖ΔW‖² (e.g. 0.9)",
    )
    parser.add_argument(
        "--psnr_images",
        type=int,
        default=2,
        help="images sampled with the adapter and with the export to compare (0: none)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of those images")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="sampler steps of those images")
    parser.add_argument("--seed", type=int, default=0, help="seed of those images")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    adapters = args.adapter[0] if len(args.adapter) == 1 and args.weights is None else args.adapter
    output = Path(args.output) if args.output else default_output(args.adapter[0], args.format)
    report = export_adapter(adapters, output, args.format, base_model=args.base, rank=args.rank,
                            weights=args.weights,
                            energy=args.energy, psnr_images=args.psnr_images, prompt=args.prompt,
                            num_inference_steps=args.num_inference_steps, seed=args.seed)
    print(report.summary())
    print(f"report: {report.path}.report.json")


if __name__ == "__main__":
    run_main(main)
