#!/usr/bin/env python
"""Each method against LoRA, trained and evaluated alike (--suite: with intervals).

``difftune benchmark`` as a script of the checkout: the command is the package module
``difftune/commands/benchmark.py`` (its docstring and ``--help`` say everything), and
``python eval/benchmark.py ...`` runs it.
"""

from difftune.commands.benchmark import main
from difftune.errors import run_main

if __name__ == "__main__":
    run_main(main)
