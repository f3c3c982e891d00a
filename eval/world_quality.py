#!/usr/bin/env python
"""The embedded model, or a one-step adapter, measured in its world.

``difftune world-quality`` as a script of the checkout: the command is the package module
``difftune/commands/world_quality.py`` (its docstring and ``--help`` say everything), and
``python eval/world_quality.py ...`` runs it.
"""

from difftune.commands.world_quality import main
from difftune.errors import run_main

if __name__ == "__main__":
    run_main(main)
