#!/usr/bin/env python
"""Fine-tuning of a difftune adapter on a captioned image dataset (a style, a domain, a look).

``difftune train-text-to-image`` as a script of the checkout: the command is the package module
``difftune/commands/train_text_to_image.py`` (its docstring and ``--help`` say everything), and
``python train_scripts/train_text_to_image.py ...`` runs it. ``accelerate launch
train_scripts/train_text_to_image.py`` works as well, as do ``accelerate launch -m difftune
train-text-to-image`` and ``accelerate launch -m difftune.commands.train_text_to_image``.
"""

from difftune.commands.train_text_to_image import build_parser, main  # noqa: F401 (build_parser: docs' flag tables)
from difftune.errors import run_main

if __name__ == "__main__":
    run_main(main)
