"""Errors a user can trigger. Each message names the file, flag or module at fault."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class DifftuneError(ValueError):
    """Base class: bad input that difftune refuses before doing heavy work."""


class TargetError(DifftuneError):
    """A target preset/pattern matched nothing, or matched layers a method cannot take."""


class AdapterFileError(DifftuneError):
    """An adapter file is missing, pickle-based, truncated, corrupt or not a difftune file."""


class BaseModelMismatchError(DifftuneError):
    """An adapter file was trained on a base model other than the one it is loaded into."""


def run_main(main: Callable[[], object]) -> None:
    """A script's entry point: bad input ends as "<script>: error: <message>" and exit status 2.

    Like argparse's own errors, so a user reads which file, flag or module is at fault instead
    of a traceback. Only ``DifftuneError`` is caught: anything else is a bug and keeps its trace.
    """
    try:
        main()
    except DifftuneError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
