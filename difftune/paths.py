"""Where the files shipped with difftune live: the embedded model, prompt lists, subjects.

The repository's top-level ``assets/`` folder is the package's ``difftune/assets``: a link to
it in a source checkout, the folder itself in a wheel (package data). A checkout, an editable
install and a plain ``pip install .`` therefore find the built-in names the same way.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
