"""Errors a user can trigger. Each message names the file, flag or module at fault."""


class DifftuneError(ValueError):
    """Base class: bad input that difftune refuses before doing heavy work."""


class TargetError(DifftuneError):
    """A target preset/pattern matched nothing, or matched layers a method cannot take."""


class AdapterFileError(DifftuneError):
    """An adapter file is missing, pickle-based, truncated, corrupt or not a difftune file."""


class BaseModelMismatchError(DifftuneError):
    """An adapter file was trained on a base model other than the one it is loaded into."""
