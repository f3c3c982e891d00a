"""Markdown flag tables rendered from the training scripts' own argparse parsers.

The documentation's flag tables are generated, never written by hand, so they cannot drift from
the flags: a page marks each table with a pair of HTML comments naming the script whose parser
fills it,

    <!-- flags: train_scripts/train_subject.py -->
    ...generated tables...
    <!-- end flags -->

and ``python -m difftune.training.flag_docs docs/training.md`` rewrites what lies between them
(``--check`` only reports whether it is current; the test suite runs the same check). Script paths
are relative to the folder that holds ``docs/`` (the repository root).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import DifftuneError
from ..io import write_text
from ..paths import ASSETS_DIR

SECTION = re.compile(r"(<!-- flags: (?P<script>\S+) -->\n)(?P<body>.*?)(<!-- end flags -->)", re.S)
DEFAULT_GROUP_TITLES = ("options", "optional arguments")


def _cell(text: str) -> str:
    """One table cell: a single line, pipes escaped, argparse's ``%%`` undone."""
    return " ".join(text.replace("%%", "%").split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is None or default is argparse.SUPPRESS:
        return ""
    if default == "":
        return '`""`'
    if isinstance(default, str) and Path(default).is_absolute():
        # a shipped file (the prompt lists): its place in the repository, not on this machine
        for assets in (ASSETS_DIR, ASSETS_DIR.resolve()):
            if Path(default).is_relative_to(assets):
                default = f"assets/{Path(default).relative_to(assets).as_posix()}"
                break
    return f"`{default}`"


def parser_markdown(parser: argparse.ArgumentParser) -> str:
    """Every flag of ``parser`` as one table per argument group: flag, default, meaning.

    Groups keep the parser's order and titles; ``--help`` and the ``--no-`` spellings of
    boolean flags are left out (the table names the flag once).
    """
    parts = []
    for group in parser._action_groups:
        rows = []
        for action in group._group_actions:
            flags = [f for f in action.option_strings if f.startswith("--") and not f.startswith("--no-")]
            if not flags or isinstance(action, argparse._HelpAction):
                continue
            names = ", ".join(f"`{flag}`" for flag in flags)
            rows.append(f"| {names} | {_default(action)} | {_cell(action.help or '')} |")
        if rows:
            title = "general" if group.title in DEFAULT_GROUP_TITLES else group.title
            parts.append("\n".join([f"**{title}**", "", "| flag | default | meaning |", "|---|---|---|",
                                    *rows]))
    return "\n\n".join(parts) + "\n"


def load_parser(script: Path) -> argparse.ArgumentParser:
    """The parser of a training script, from its ``build_parser()`` (the script is imported, not run)."""
    if not script.is_file():
        raise DifftuneError(f"flag table source {script} does not exist")
    spec = importlib.util.spec_from_file_location(f"_flag_docs_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "build_parser", None)):
        raise DifftuneError(f"{script} has no build_parser() to document")
    return module.build_parser()


def render_page(text: str, root: Path) -> str:
    """``text`` with every marked section replaced by the tables of its script's parser."""
    def replace(match: re.Match) -> str:
        tables = parser_markdown(load_parser(root / match["script"]))
        return f"{match[1]}\n{tables}\n{match[4]}"

    return SECTION.sub(replace, text)


def update_page(page: Path, check: bool = False) -> bool:
    """Regenerate the flag tables of ``page`` in place; True when it was already current."""
    text = page.read_text()
    if not SECTION.search(text):
        raise DifftuneError(f"{page} has no '<!-- flags: <script> -->' section to generate")
    rendered = render_page(text, page.resolve().parent.parent)
    if rendered == text:
        return True
    if not check:
        write_text(page, rendered)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="+", type=Path, help="markdown pages with flag sections")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a page is stale")
    args = parser.parse_args(argv)
    stale = [page for page in args.pages if not update_page(page, check=args.check)]
    for page in stale:
        print(f"{page}: flag tables {'out of date' if args.check else 'regenerated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
