"""The adversarial campaign behind the reliability table of docs/benchmarks.md, from one command.

Each row runs some of the test suite's adversarial tests (pytest, in a subprocess, offline, one
thread) and counts their cases: a parametrised case is one case; where one test tries many
(the adapter-file and checkpoint fuzz tests, the kill test) it prints its counts and they are read
here. Every case must end as its row says or its test fails, so "answered" counts the cases of the
tests that passed; a row with a failing test shows the failures. The campaign sets
DIFFTUNE_FULL_CAMPAIGN=1: the fuzz, kill and checkpoint-damage tests then run their documented counts
(the plain test suite runs a seeded sample of each, to keep CI short).

    python benchmarks/reliability.py                            # every row, printed
    python benchmarks/reliability.py --rows fuzz kills          # some rows
    python benchmarks/reliability.py --docs docs/benchmarks.md  # and the table written there
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Reliability"


@dataclasses.dataclass
class Row:
    key: str
    what: str
    paths: tuple[str, ...]
    select: str = ""  # pytest -k
    answer: str = ""  # what every case must end as


ROWS = [
    Row("kills", "SIGKILL of a training run, every method: right before the renames that finish a checkpoint "
        "file, its marker, its folder, a pruning and the final adapter, and at a random moment of the steps",
        ("tests/training/test_kill_resilience.py", "tests/training/test_train_subject_resume.py"),
        "killed_anywhere or killed_run",
        "after every kill each counted checkpoint is intact and loads, the next start removes the leftovers, "
        "and the resumed run ends bit-identical to an uninterrupted one"),
    Row("fuzz", "fuzzed adapter files, every method (seeded: truncation, header and data byte flips, length "
        "field, metadata junk and extra keys, missing tensors, wrong dtypes and shapes, NaN/inf, with and "
        "without the checksum; edits of the file-kind markers)", ("tests/tuners/test_adapter_fuzz.py",)),
    Row("defects", "damaged adapter files, one defect each (header fields missing or mistyped, bad option "
        "types, non-finite options of every method, missing/extra tensors, int/bool dtypes, wrong shapes, "
        "NaN, SaRA pairs missing, an SVFit sigma empty or too long, a flipped data byte, an edited option, a "
        "damaged difftune marker, a FIFO, /dev/zero)", ("tests/test_adapter_files.py",),
        "damaged or sara_file or checksum or special or marker or non_finite or empty_or_too_long",
        "refused with an AdapterFileError naming the file and the field or tensor; the model untouched"),
    Row("imports", "LoRA files of other tools (peft/diffusers with lora_adapter_metadata: alpha ≠ rank, rank "
        "and alpha patterns, rsLoRA; kohya with per-module alphas; a difftune LoRA without its own entry)",
        ("tests/export/test_import_layouts.py",), "",
        "imported at the strength the writing pipeline had (and as diffusers' load_lora_weights reads "
        "the peft files)"),
    Row("checkpoints", "damaged checkpoints (seeded: bit flips, byte edits, cuts, a deleted file, a digit "
        "changed in the JSON, in every file, the marker included)", ("tests/training/test_checkpointing.py",),
        "damaged_checkpoint"),
    Row("resume", "incomplete or edited checkpoints and interrupted saves (no marker, a file cut or missing, "
        "pruning killed, a damaged optimizer state, trainer_state.json edited, an exponent bit flipped, a "
        "file system turning read-only mid-run, resuming with other optimisation settings)",
        ("tests/training/test_train_subject_resume.py",),
        "incomplete or pruning or damaged or edited or read_only or optimisation or failing_save",
        "refused in one line naming the file or setting before the model loads, or not counted by latest "
        "(which falls back to the newest intact checkpoint with a warning); nothing written before is lost"),
    Row("lock", "two trainers on one --output_dir; a holder killed; a file system without flock",
        ("tests/training/test_output_lock.py",), "",
        "the second refused in one line naming the folder and the first run's pid and command; a killed "
        "holder does not block"),
    Row("diverging", "diverging training (huge LoRA scale, NaN loss, NaN gradient, a method hook leaving "
        "inf; with and without clipping)", ("tests/training/test_train_subject.py",),
        "non_finite or diverging or hook_that",
        "stopped at the first non-finite step with one line naming it and what to change; no NaN/inf adapter "
        "or checkpoint written"),
    Row("trainer input", "bad trainer input (flags, nan/inf, AdamW ranges, --seed, output folder a file / "
        "unwritable / read-only, absurd resolution or adapter size, sides the pipeline refuses, "
        "metadata.jsonl lines, non-UTF-8 captions / metadata / --config, --class_data_dir a file, a missing "
        "instance folder under a recipe, ...)",
        ("tests/training/test_train_subject.py", "tests/training/test_arguments.py"),
        "bad_input or read_only or out_of_range or too_large",
        "refused in one line before any model loads"),
    Row("eval input", "bad eval and benchmark input (counts, nan, sizes, devices, a missing or offline CLIP, "
        "a corrupt image, corrupt / pickle / wrong-base adapters, unclosed quotes in trainer flags, bad "
        "trainer flags, ...)", ("tests/scripts/test_eval_scripts.py", "tests/scripts/test_benchmark.py"),
        "bad_values or bad_input or trainer_flags or method_args",
        "refused in one line before any model loads or any method trains"),
    Row("exports", "exports: each tensor merged on its own against the whole merge (every method, two "
        "scales), the streamed writer's one-tensor rule, streamed single files, text-encoder norms ComfyUI "
        "has no key for", ("tests/export/test_export_stream.py",), "",
        "equal bit for bit; the diff holds only keys ComfyUI maps and its report names every tensor it left "
        "out"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=[row.key for row in ROWS], default=None,
                        help="run only these rows (default: all)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="markdown file whose reliability table is replaced (every row must have run)")
    return parser.parse_args(argv)


def command(row: Row) -> list[str]:
    select = ["-k", row.select] if row.select else []
    return ["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *row.paths, *select]


def run(row: Row) -> dict:
    """The row's tests, their cases and what they printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "DIFFTUNE_FULL_CAMPAIGN": "1"}
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *command(row), f"--junitxml={report}"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        cases = [case for case in ElementTree.parse(report).getroot().iter("testcase")
                 if case.find("skipped") is None]
    failed = [case.get("name") for case in cases if case.find("failure") is not None
              or case.find("error") is not None]
    return {"tests": len(cases), "names": [case.get("name") for case in cases], "failed": failed,
            "out": done.stdout, "seconds": seconds}


def answered(row: Row, result: dict) -> tuple[str, str]:
    """(cases, answered as required) of a row."""
    out, passed = result["out"], result["tests"] - len(result["failed"])
    failures = f"; FAILED: {', '.join(result['failed'])}" if result["failed"] else ""
    if row.key == "fuzz":
        counts, methods = Counter(), []
        for method, total, outcomes in re.findall(r"^\.?(\w+): (\d+) mutations: (\{[^}]*\});", out, re.M):
            methods.append(f"{method} {total}")
            counts.update(ast.literal_eval(outcomes))
        total = sum(counts.values())
        detail = (f"{counts['refused']} refused with an AdapterFileError naming the file, "
                  f"{counts['loaded the original']} loaded exactly the original weights and options, "
                  f"{counts['imported as written']} LoRA files without difftune's entry imported at their "
                  f"own alpha (diffusers' lora_adapter_metadata), {counts['bare tensors']} LoRA files "
                  "stripped of every header imported as diffusers reads bare tensors (alpha = rank); 0 wrong "
                  "weights, 0 other exception types")
        return f"{total} ({', '.join(methods)})", f"{total if not failures else '?'}: {detail}{failures}"
    if row.key == "checkpoints":
        match = re.search(r"checkpoint damage: (\d+) mutations; refused by kind, and harmless: "
                          r"(\{[^}]*\})", out)
        kinds = ast.literal_eval(match.group(2)) if match else {}
        harmless = kinds.pop("harmless", 0)
        refused = sum(kinds.values())
        total = match.group(1) if match else "?"
        return total, (f"{refused} refused before anything loads, naming the file ("
                       + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + f"), {harmless} harmless "
                       f"(whitespace added to the marker, resumed as the intact checkpoint); in each case "
                       f"latest resumed the older intact checkpoint{failures}")
    if row.key == "kills":
        kills = [(m, int(n)) for m, n in re.findall(r"kills (\w+): (\d+) kills", out)]
        plain = sum("killed_run" in name for name in result["names"])  # a plain `python` run, killed once
        total = sum(n for _, n in kills) + plain
        return (f"{total} kills ({', '.join(f'{m} {n}' for m, n in kills)}, and {plain} of a plain run)",
                f"{passed} of {result['tests']} tests passed: {row.answer}{failures}")
    return f"{result['tests']} cases", f"{passed}: {row.answer}{failures}"


def table(rows: list[Row], results: dict[str, dict]) -> str:
    lines = ["| what | cases | answered as required | command |", "|---|---|---|---|"]
    for row in rows:
        if row.key not in results:
            continue
        cases, answer = answered(row, results[row.key])
        select = f' -k "{row.select}"' if row.select else ""
        lines.append(f"| {row.what} | {cases} | {answer} | `DIFFTUNE_FULL_CAMPAIGN=1 python -m pytest -q -s "
                     f"{' '.join(row.paths)}"
                     f"{select}` ({results[row.key]['seconds']:.0f} s) |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch
    import transformers

    from difftune.machine import cpu_name

    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, load average {os.getloadavg()[0]:.1f} at the start")


def write_docs(docs: Path, text: str, machine_text: str) -> None:
    page = docs.read_text()
    start = page.index(SECTION)
    end = page.find("\n## ", start + len(SECTION))
    body = (f"{SECTION}\n\n`python benchmarks/reliability.py --docs docs/benchmarks.md` on {machine_text}, "
            "`HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1`. Each row runs the tests it names with "
            "`DIFFTUNE_FULL_CAMPAIGN=1` (the counts below; the plain test suite runs a seeded sample of the "
            "fuzz, kill and checkpoint-damage cases); every case in them must end as stated or the test "
            "fails, so a passing row means 100 %. The seconds are each row's wall time on the shared "
            "machine.\n\n"
            + text)
    docs.write_text(page[:start] + body + (page[end:] if end != -1 else ""))


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [row for row in ROWS if args.rows is None or row.key in args.rows]
    machine_text = machine()
    results = {}
    for row in rows:
        results[row.key] = run(row)
        print(f"{row.key}: {results[row.key]['tests']} tests, {len(results[row.key]['failed'])} failed, "
              f"{results[row.key]['seconds']:.0f} s", flush=True)
    text = table(rows, results)
    print(f"\nMachine: {machine_text}\n\n{text}")
    if args.docs:
        if args.rows is not None:
            raise SystemExit("--docs writes the whole table: run every row")
        write_docs(args.docs, text, machine_text)


if __name__ == "__main__":
    main()
