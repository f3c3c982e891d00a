"""difftune.io: every output is written whole or not at all."""

from __future__ import annotations

import errno
import json
import os

import pytest
from PIL import Image

from difftune.errors import DifftuneError
from difftune.io import (
    TEMP_SUFFIX,
    atomic_write,
    check_output_dir,
    copy_file,
    read_json,
    remove_stale_temp_files,
    save_image,
    write_json,
    write_text,
)


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write("half of the new")
        raise KeyboardInterrupt  # a user's ^C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    def no_space(tmp: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DifftuneError, match="report.md: cannot write"):
        atomic_write(tmp_path / "report.md", no_space)
    assert list(tmp_path.iterdir()) == []


def test_files_get_the_mode_open_would_give(tmp_path):
    umask = os.umask(0o027)
    try:
        path = write_text(tmp_path / "a" / "b.txt", "x")  # the folder is created too
    finally:
        os.umask(umask)
    assert path.read_text() == "x"
    assert path.stat().st_mode & 0o777 == 0o640


def test_json_image_and_copy_round_trip(tmp_path):
    data = {"clip_i": 0.5, "path": tmp_path}  # paths are written as strings
    write_json(tmp_path / "r.json", data)
    assert read_json(tmp_path / "r.json") == {"clip_i": 0.5, "path": str(tmp_path)}
    assert json.loads((tmp_path / "r.json").read_text())["clip_i"] == 0.5
    assert read_json(tmp_path / "absent.json", missing_ok=True) is None
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "absent.json")

    image = Image.new("RGB", (3, 2), (10, 20, 30))
    save_image(tmp_path / "i.png", image)
    with Image.open(tmp_path / "i.png") as loaded:
        assert loaded.format == "PNG" and loaded.getpixel((2, 1)) == (10, 20, 30)

    copy_file(tmp_path / "i.png", tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_bytes() == (tmp_path / "i.png").read_bytes()


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    stale = tmp_path / f".adapter.safetensors.k2j4{TEMP_SUFFIX}"
    stale.write_bytes(b"partial")
    kept = [tmp_path / "adapter.safetensors", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in kept:
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)


def test_output_dir_check_names_the_flag(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("")
    with pytest.raises(DifftuneError, match="--out .*is a file"):
        check_output_dir(a_file, flag="--out")
    check_output_dir(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir() and list((tmp_path / "new" / "dir").iterdir()) == []
