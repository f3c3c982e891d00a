"""Export error against rank for each method: adapters trained on builtin:embedded, exported to
kohya LoRA files by SVD at several ranks and energies, and losslessly as a diff.

For each adapter file and setting the table gives the overall relative Frobenius error
‖ΔW − ΔW_r‖ / ‖ΔW‖ over every changed tensor, the PSNR of images sampled from the exported file
against the adapter's own (same prompt and seeds), and the file size.

    python benchmarks/export_error.py RUN_DIR/lora/adapter.safetensors RUN_DIR/sara/adapter.safetensors ... \\
        --output_dir outputs/export_error --write-docs
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import difftune
from difftune.errors import run_main
from difftune.export import export_adapter
from difftune.machine import cpu_name
from difftune.model_factory import load_pipeline

RANKS = (1, 2, 4, 8, 16, 32)
ENERGIES = (0.5, 0.9)
DOCS_TABLE = Path(__file__).resolve().parent.parent / "docs" / "export_error_embedded.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("adapters", nargs="+", help="difftune adapter files trained on builtin:embedded")
    parser.add_argument("--output_dir", default="outputs/export_error")
    parser.add_argument("--prompt", default="a large sks yellow circle")
    parser.add_argument("--psnr_images", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--write-docs", action="store_true", help=f"write the table to {DOCS_TABLE.name}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    pipe = load_pipeline("builtin:embedded")
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for path in args.adapters:
        info = difftune.read_adapter_info(path)
        method = info["method"]
        exact_lora = difftune.METHODS[method].exact_lora_refusal(info["config"]) is None
        settings = [("diff", {}), *([("kohya", {})] if exact_lora else [])]
        settings += [("kohya", {"rank": r}) for r in RANKS] + [("kohya", {"energy": e}) for e in ENERGIES]
        base_row = None
        for fmt, option in settings:
            name = f"{method}_{fmt}_{'_'.join(f'{k}{v}' for k, v in option.items()) or 'plain'}.safetensors"
            report = export_adapter(path, output_dir / name, fmt, pipeline=pipe,
                                    psnr_images=args.psnr_images, prompt=args.prompt,
                                    num_inference_steps=args.num_inference_steps, **option)
            ranks = sorted({layer["rank"] for layer in report.layers})
            rows.append({"method": method, "setting": _label(fmt, option),
                         "relative_error": report.relative_error, "psnr_db": report.psnr_db,
                         "identical_images": report.identical_images,
                         "ranks": f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else "".join(map(str, ranks)),
                         "size_mib": report.size_bytes / 2**20})
            print(json.dumps(rows[-1]))
            if base_row is None and report.base_psnr_db is not None:  # what leaving the adapter out gives
                base_row = {"method": method, "setting": "base model (no adapter)", "relative_error": 1.0,
                            "psnr_db": report.base_psnr_db, "identical_images": False, "ranks": "",
                            "size_mib": 0.0}
        rows.append(base_row)
    machine = f"{cpu_name()}, torch {torch.__version__}, Python {platform.python_version()}"
    (output_dir / "export_error.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n"
    )
    table = markdown(rows, args, machine)
    print(table)
    if args.write_docs:
        DOCS_TABLE.write_text(table)


def _label(fmt: str, option: dict) -> str:
    if fmt == "diff":
        return "lossless diff"
    if "rank" in option:
        return f"rank {option['rank']}"
    return f"energy {option['energy']}" if option else "exact LoRA"


def _cell(value: float | None, fmt: str, empty: str) -> str:
    return empty if value is None else format(value, fmt)


def markdown(rows: list[dict], args: argparse.Namespace, machine: str) -> str:
    lines = [
        "| method | export | layer ranks | relative error ‖ΔW − ΔW_export‖/‖ΔW‖ | image PSNR vs adapter (dB) "
        "| file (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        error = "0 (exact)" if row["relative_error"] is None else f"{row['relative_error']:.4f}"
        psnr = "identical" if row["identical_images"] else _cell(row["psnr_db"], ".1f", "–")
        size = f"{row['size_mib']:.2f}" if row["size_mib"] else "–"
        ranks = row["ranks"] or "–"
        lines.append(f"| {row['method']} | {row['setting']} | {ranks} | {error} | {psnr} | {size} |")
    lines += [
        "",
        f"Measured with `python benchmarks/export_error.py` ({args.psnr_images} images, prompt "
        f'"{args.prompt}", {args.num_inference_steps} steps) on {machine}.',
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
