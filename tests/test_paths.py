"""difftune.paths: shipped files are recorded the same way on every machine."""

from pathlib import Path

from difftune.paths import ASSETS_DIR, portable_path


def test_a_shipped_file_is_recorded_relative_to_the_assets():
    assert portable_path(ASSETS_DIR / "subjects" / "heart") == "assets/subjects/heart"
    clip = str(ASSETS_DIR / "embedded_model" / "world_clip")
    assert portable_path(clip) == "assets/embedded_model/world_clip"
    # through the package's own link to the assets folder, as an installed difftune names it
    package_view = Path(__import__("difftune").__file__).parent / "assets" / "subjects"
    assert portable_path(str(package_view)) == "assets/subjects"


def test_anything_else_is_kept(tmp_path):
    assert portable_path(tmp_path / "subjects") == str(tmp_path / "subjects")
    assert portable_path("builtin:embedded") == "builtin:embedded"
    assert portable_path("lora") == "lora"
    assert portable_path(3e-4) == 3e-4
    assert portable_path(None) is None
    assert portable_path("") == ""
