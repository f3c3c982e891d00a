"""One training run per output folder: a lock the running trainer holds on its ``--output_dir``.

Two trainers writing one folder overwrite each other's checkpoints and adapter, and each also
removes what it takes for the other's half-written saves. The lock is an advisory ``flock`` on
``<output_dir>/.difftune.lock``, which the kernel releases when its process ends, however it ends:
a run killed with SIGKILL leaves no lock that blocks the next one. The file also names its
holder (pid, host, start time, command) for the refusal message. Where the file system has no
``flock`` (some network file systems), the recorded pid decides: a holder that no longer runs on
this host does not block.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .errors import DifftuneError

LOCK_FILE_NAME = ".difftune.lock"
# flock answers these where the file system cannot lock; the recorded pid decides then
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputDirLock:
    """A held lock; `release` gives it back (the end of the process does too)."""

    def __init__(self, folder: Path, handle: TextIO):
        self.folder = folder
        self.handle = handle

    def release(self) -> None:
        _HELD.pop(self.folder, None)
        with contextlib.suppress(OSError, ValueError):
            _unlock(self.handle)
            self.handle.close()


_HELD: dict[Path, OutputDirLock] = {}  # by resolved folder: a process re-entering its own folder


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:200]}


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the recorded holder may still run: another host's process cannot be asked."""
    if owner.get("host") != socket.gethostname():
        return bool(owner)
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "a process that did not record itself"
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command', '')}").rstrip(": ")


def _try_lock(handle: TextIO) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in _NO_FLOCK:
            return None
        raise
    return True


def _unlock(handle: TextIO) -> None:
    with contextlib.suppress(ImportError):
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_output_dir(folder: str | os.PathLike, flag: str = "--output_dir") -> OutputDirLock:
    """Hold ``folder`` for this process, or refuse in one line naming the folder and the process that
    holds it. Taking a folder this process already holds returns the same lock."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return _HELD[folder]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE_NAME
    for _ in range(2):
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        locked = _try_lock(handle)
        owner = _read_owner(path)
        if locked is None and not _alive(owner):
            locked = True  # no flock here: a holder that no longer runs does not count
        if locked:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(_owner()))
            handle.flush()
            _HELD[folder] = OutputDirLock(folder, handle)
            return _HELD[folder]
        handle.close()
        if owner and not _alive(owner):
            # held, but not by the process it names (a child it forked outlived it): a new lock file
            path.unlink(missing_ok=True)
            continue
        break
    raise DifftuneError(f"{flag} {folder} is in use by another training run ({_describe(owner)}); wait for "
                        f"it to end, or choose another {flag}")


def release_all() -> None:
    """Give back every lock this process holds (a trainer's end)."""
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(release_all)  # close the lock files of runs that ended with an error, quietly
