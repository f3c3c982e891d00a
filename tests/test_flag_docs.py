"""Flag tables rendered from argparse parsers (difftune.training.flag_docs)."""

import argparse

import pytest

from difftune.errors import DifftuneError
from difftune.paths import ASSETS_DIR
from difftune.training import flag_docs

SCRIPT = '''
import argparse


def build_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", help="a file")
    group = parser.add_argument_group("data")
    group.add_argument("--size", type=int, default=64, help="image size |px|, 100%% of it")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                       help="flip\\n   images")
    group.add_argument("--rank", "--lora_rank", help="rank")
    return parser
'''


def test_tables_follow_the_parser_group_by_group():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", help="a file")
    group = parser.add_argument_group("data")
    group.add_argument("--size", type=int, default=64, help="image size |px|, 100%% of it")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flip\n   images")
    group.add_argument("--rank", "--lora_rank", help="rank")
    group.add_argument("--prompts", default=str(ASSETS_DIR / "one_step_prompts.txt"), help="prompts")
    group.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument_group("empty")
    assert flag_docs.parser_markdown(parser) == (
        "**general**\n\n| flag | default | meaning |\n|---|---|---|\n| `--config` |  | a file |\n\n"
        "**data**\n\n| flag | default | meaning |\n|---|---|---|\n"
        "| `--size` | `64` | image size \\|px\\|, 100% of it |\n"
        "| `--flip` | `True` | flip images |\n"
        "| `--rank`, `--lora_rank` |  | rank |\n"
        "| `--prompts` | `assets/one_step_prompts.txt` | prompts |\n"
        '| `--negative` | `""` | negative prompt |\n')


def test_a_page_is_regenerated_between_its_markers_and_checked(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/train.py").write_text(SCRIPT)
    page = tmp_path / "docs/page.md"
    page.parent.mkdir()
    page.write_text("# Flags\n\n<!-- flags: scripts/train.py -->\nold table\n<!-- end flags -->\n\nafter\n")
    assert flag_docs.main([str(page), "--check"]) == 1
    assert "old table" in page.read_text(), "--check changes nothing"
    assert flag_docs.main([str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Flags\n\n<!-- flags: scripts/train.py -->\n\n**general**")
    assert text.endswith("| `--rank`, `--lora_rank` |  | rank |\n\n<!-- end flags -->\n\nafter\n")
    assert flag_docs.update_page(page, check=True)
    assert flag_docs.render_page(text, tmp_path) == text  # rendering is a fixed point


def test_bad_pages_are_refused_with_their_names(tmp_path):
    page = tmp_path / "docs/page.md"
    page.parent.mkdir()
    page.write_text("no markers\n")
    with pytest.raises(DifftuneError, match="page.md has no '<!-- flags"):
        flag_docs.update_page(page)
    page.write_text("<!-- flags: scripts/missing.py -->\n<!-- end flags -->\n")
    with pytest.raises(DifftuneError, match="missing.py does not exist"):
        flag_docs.update_page(page)
    (tmp_path / "plain.py").write_text("X = 1\n")
    page.write_text("<!-- flags: plain.py -->\n<!-- end flags -->\n")
    with pytest.raises(DifftuneError, match="plain.py has no build_parser"):
        flag_docs.update_page(page)
