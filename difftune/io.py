"""Writing files so that nothing is lost: every output goes to a temporary file in the same
folder and is renamed over its final name, so a killed run never leaves half a file.

One home for the savers every part of difftune uses (adapter files, checkpoints, reports,
images, caches); ``remove_stale_temp_files`` cleans what a killed writer left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DifftuneError

TEMP_SUFFIX = ".tmp"
# a full disk or quota, a read-only file system, a folder without write permission
_USER_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _mode_for_new_files() -> int:
    """0o666 less the process umask: what ``open()`` would have given the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def user_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn what the machine's state makes a write fail with (a full disk or quota, a file system
    turned read-only, a folder without permission) into one line naming ``path``; what was written
    before stays as it was. Any other OSError is a bug and keeps its traceback."""
    try:
        yield
    except OSError as err:
        if err.errno in _USER_WRITE_ERRORS:
            raise DifftuneError(f"{path}: cannot write: {err.strerror or err}") from None
        raise


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)``, then move the finished file over ``path``.

    ``mkstemp`` creates the temporary file with mode 0600; it gets the mode a plain ``open()``
    would give (the umask's) before the rename, so outputs are readable by whom the user means.
    """
    path = Path(path)
    with user_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, _mode_for_new_files())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_folder(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(staging_folder)`` on a fresh folder beside ``path``, then swap it in for ``path``:
    an interrupted writer never leaves a half-written folder where one was."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        write(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def check_output_dir(output_dir: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Create ``output_dir`` or check that it is a writable folder, before any model loads: a run
    must not train for hours and then fail at its first save."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DifftuneError(f"{flag} {output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=TEMP_SUFFIX, dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DifftuneError(f"{flag} {output_dir} is not writable: {err.strerror or err}") from None


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_write` leaves when its process is killed mid-write.

    They are named ``.<final name>.<random>.tmp``; nothing else in a folder is touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """A user's text file (captions, metadata, configs, prompts) as UTF-8; anything else is one line
    naming the file (``what``: the flag or kind it came from) instead of a UnicodeDecodeError."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DifftuneError(f"{name}: not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                            "UTF-8") from None
    except OSError as err:
        raise DifftuneError(f"{name}: cannot read: {err.strerror or err}") from None


def read_json(path: str | os.PathLike, missing_ok: bool = False) -> Any:
    """The parsed file; ``None`` for a file that does not exist when ``missing_ok`` (caches)."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def save_image(path: str | os.PathLike, image: Any) -> Path:
    """A PIL image as PNG."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_webp(frames: Any, path: str | os.PathLike, fps: float = 16.0) -> Path:
    """PIL frames as an animated, lossless WebP that loops (one frame: a still WebP): a clip that any
    browser plays and Pillow reads back frame for frame."""
    duration = max(1, round(1000.0 / fps))

    def write(tmp: str) -> None:
        first, *rest = [frame.convert("RGB") for frame in frames]
        first.save(tmp, format="WEBP", save_all=bool(rest), append_images=rest, duration=duration, loop=0,
                   lossless=True, quality=100, method=0)

    return atomic_write(path, write)


def copy_file(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    import shutil

    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))
