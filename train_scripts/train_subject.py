#!/usr/bin/env python
"""Subject-driven (DreamBooth) training of a difftune adapter.

``difftune train-subject`` as a script of the checkout: the command is the package module
``difftune/commands/train_subject.py`` (its docstring and ``--help`` say everything), and
``python train_scripts/train_subject.py ...`` runs it. ``accelerate launch train_scripts/train_subject.py``
works as before, as do ``accelerate launch -m difftune train-subject`` and
``accelerate launch -m difftune.commands.train_subject``.
"""

from difftune.commands.train_subject import build_parser, main  # noqa: F401 (build_parser: docs' flag tables)
from difftune.errors import run_main

if __name__ == "__main__":
    run_main(main)
