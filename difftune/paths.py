"""Where the files shipped with difftune live (the embedded model, prompt lists, subjects), and what
image and subject files are called.

The repository's top-level ``assets/`` folder is the package's ``difftune/assets``: a link to
it in a source checkout, the folder itself in a wheel (package data). A checkout, an editable
install and a plain ``pip install .`` therefore find the built-in names the same way.
"""

from pathlib import Path

from .errors import DifftuneError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SUBJECTS_DIR = ASSETS_DIR / "subjects"
BUILTIN_PREFIX = "builtin:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SUBJECT_FILE = "subject.json"  # a subject's identifier, class and prompts (metrics.subject, recipes, world)


def portable_path(value: object) -> object:
    """``value`` as a shared report should record it.

    A path to a file shipped with difftune becomes ``assets/...``, the same on every machine
    (an absolute path would name the folder of one checkout); anything else is returned as is,
    with a ``Path`` as its string.
    """
    if not isinstance(value, (str, Path)) or not str(value):
        return value
    try:
        inside = Path(value).resolve().relative_to(ASSETS_DIR.resolve())
    except (ValueError, OSError):
        return str(value) if isinstance(value, Path) else value
    return (Path("assets") / inside).as_posix()


def builtin_subjects() -> list[str]:
    """The subjects shipped with difftune (``builtin:<name>``), sorted."""
    return sorted(path.name for path in SUBJECTS_DIR.iterdir() if path.is_dir())


def subject_folder(value: str) -> str:
    """A subject folder as the flags take it: ``builtin:<name>`` is a shipped subject (``builtin:heart``:
    its images and subject.json, wherever difftune is installed, so a command runs the same from any
    folder); anything else is a folder path, returned as given."""
    if not value.startswith(BUILTIN_PREFIX):
        return value
    name = value.removeprefix(BUILTIN_PREFIX)
    if name not in builtin_subjects():
        raise DifftuneError(f"{value} is not a built-in subject (built-in: "
                            f"{', '.join(BUILTIN_PREFIX + each for each in builtin_subjects())})")
    return str(SUBJECTS_DIR / name)
