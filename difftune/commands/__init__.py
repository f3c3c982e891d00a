"""The ``difftune`` command: one console entry point, one subcommand per job.

    difftune train-subject --instance_data_dir builtin:heart --instance_prompt "a large sks red heart"
    difftune evaluate --adapter outputs/subject --instance_data_dir builtin:heart --include_base ...
    accelerate launch -m difftune train-subject ...     # several GPUs or processes

Each subcommand is a module of this package with a ``main(argv)`` (its flags: ``difftune
<command> --help``), so ``python -m difftune.commands.train_subject`` and ``accelerate launch -m
difftune.commands.train_subject`` run it too, and the scripts of a checkout (``train_scripts/``,
``eval/``) are thin wrappers around the same modules. A module is imported only when its
subcommand runs: ``difftune --help`` loads no model library.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import run_main

PROGRAM = "difftune"

# subcommand -> (module with main(argv), one line for `difftune --help`); a new command is one row
COMMANDS: dict[str, tuple[str, str]] = {
    "train-subject": ("difftune.commands.train_subject",
                      "subject-driven (DreamBooth) training of an adapter on a few images"),
    "train-text-to-image": ("difftune.commands.train_text_to_image",
                            "fine-tuning of an adapter on a captioned image dataset (a style), with buckets"),
    "train-one-step": ("difftune.commands.train_one_step",
                       "one-step generation (HiPA): an adapter that draws in one denoiser call"),
    "evaluate": ("difftune.commands.evaluate_subject",
                 "subject fidelity and prior preservation of adapters (DINO, CLIP-I, CLIP-T, PRES, FID)"),
    "export": ("difftune.export.__main__",
               "an adapter file for kohya / A1111 / ComfyUI, as a diff, or merged into a diffusers folder"),
    "benchmark": ("difftune.commands.benchmark",
                  "every method against LoRA, trained and evaluated alike (--suite: with intervals; "
                  "--style_suite: fine-tuned on style domains)"),
    "world-quality": ("difftune.commands.world_quality",
                      "the embedded model, or a one-step adapter, measured in its world"),
    "params": ("difftune.params", "trainable parameters of each method on a model"),
    "memory": ("difftune.memory", "estimated training memory of each method on a large model's config"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (f"usage: {PROGRAM} <command> [flags]   ({PROGRAM} <command> --help: its flags)\n\n"
            f"parameter-efficient fine-tuning of diffusion models (difftune {__version__})\n\n"
            f"commands:\n{rows}\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``difftune <command> [flags]``: the command's module gets the flags as its command line
    (and ``difftune <command>`` as its program name, in its usage and error lines)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] == "--version":
        print(f"{PROGRAM} {__version__}")
        return
    command, flags = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{usage()}\n{PROGRAM}: error: unknown command {command!r}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[command][0])
    saved, sys.argv = sys.argv, [f"{PROGRAM} {command}", *flags]
    try:
        run_main(module.main)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
