#!/usr/bin/env python
"""Subject-driven adapters evaluated (DINO, CLIP-I, CLIP-T, PRES, FID).

``difftune evaluate`` as a script of the checkout: the command is the package module
``difftune/commands/evaluate_subject.py`` (its docstring and ``--help`` say everything), and
``python eval/evaluate_subject.py ...`` runs it.
"""

from difftune.commands.evaluate_subject import main
from difftune.errors import run_main

if __name__ == "__main__":
    run_main(main)
