#!/usr/bin/env python
"""One-step (HiPA) training of a difftune adapter.

``difftune train-one-step`` as a script of the checkout: the command is the package module
``difftune/commands/train_one_step.py`` (its docstring and ``--help`` say everything), and
``python train_scripts/train_one_step.py ...`` runs it. ``accelerate launch train_scripts/train_one_step.py``
works as before, as do ``accelerate launch -m difftune train-one-step`` and
``accelerate launch -m difftune.commands.train_one_step``.
"""

from difftune.commands.train_one_step import build_parser, main  # noqa: F401 (build_parser: docs' flag tables)
from difftune.errors import run_main

if __name__ == "__main__":
    run_main(main)
