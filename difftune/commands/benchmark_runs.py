"""What the benchmarks (`difftune benchmark`, with ``--suite`` or ``--style_suite``) share: one run of a
trainer per method, in a subprocess of its own (same data, steps, seed and batch for
every method; resumable), where its files are, and each method's colour in the plots.

The trainer runs as ``python -m difftune.commands.train_subject`` with the difftune this process
imported first on the path, so a checkout, an editable install and a wheel run the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import difftune
from difftune.errors import DifftuneError
from difftune.metrics.subject import Subject

TRAINER_MODULE = "difftune.commands.train_subject"
ADAPTER_FILE = "adapter.safetensors"
SUMMARY_FILE = "train_summary.json"
# A run folder is finished once its trainer wrote the summary; a scored set once its metrics are written.
FINISHED_MARKERS = (SUMMARY_FILE, "metrics.json")

# One colour per method in every plot.
METHOD_COLORS = {"base": "#7f7f7f", "lora": "#1f77b4", "sara": "#d62728", "svfit": "#2ca02c",
                 "tlora": "#9467bd"}


def record_time(timings: dict[str, Any], path: Path, key: str, wall: float, cpu: float | None) -> None:
    """One training's or scored set's wall and CPU seconds into ``timings`` and its file ``path``
    (``timings.json``), as both suites keep them: with other work on the machine the wall time grows,
    the CPU time (the grid's cost) much less."""
    from difftune.io import write_json

    timings[key] = {"wall": round(wall, 2), "cpu": None if cpu is None else round(cpu, 2)}
    write_json(path, timings)


def copy_missing_files(source: Path, target: Path, parts: tuple[str, ...], skip: tuple[str, ...] = (),
                       cells: tuple[str, ...] = ()) -> dict[str, int]:
    """Copy what ``target`` lacks of ``source/<part>``, leaving ``target``'s own files as they are: how
    folders of one grid, each run on a share of its cells (one per core or machine), become one folder.

    ``cells`` (glob patterns relative to the folders, e.g. ``runs/*/*/*``) name the folders that are
    one piece of work, finished when they hold a train summary or scores (``FINISHED_MARKERS``); a cell
    moves whole, never as a mix of two runs' files: copied when ``target`` lacks it, put in place of
    ``target``'s when only ``source``'s is finished, else ``target``'s is kept. Other files are copied
    one by one where ``target`` lacks them. ``skip``: relative paths the caller merges itself
    (bookkeeping). Lock files are not copied. Returns how many files were copied and how many kept."""
    import shutil

    from difftune.io import copy_file
    from difftune.locking import LOCK_FILE_NAME

    def finished(folder: Path) -> bool:
        return any((folder / marker).is_file() for marker in FINISHED_MARKERS)

    def copy(item: Path) -> None:
        relative = item.relative_to(source)
        copy_file(item, target / relative)
        shutil.copystat(item, target / relative)

    counts = {"copied": 0, "kept": 0}
    cell_dirs = {d.relative_to(source) for pattern in cells for d in source.glob(pattern) if d.is_dir()}
    for cell in sorted(cell_dirs):
        files = [f for f in sorted((source / cell).rglob("*")) if f.is_file() and f.name != LOCK_FILE_NAME]
        ours = target / cell
        if ours.exists() and (finished(ours) or not finished(source / cell)):
            counts["kept"] += len(files)
            continue
        if ours.exists():  # ours unfinished, theirs finished: theirs replaces it whole
            shutil.rmtree(ours)
        for item in files:
            copy(item)
        counts["copied"] += len(files)
    for part in parts:
        for item in sorted((source / part).rglob("*")) if (source / part).is_dir() else []:
            relative = item.relative_to(source)
            if (not item.is_file() or relative.as_posix() in skip or item.name == LOCK_FILE_NAME
                    or any(cell in relative.parents for cell in cell_dirs)):
                continue
            if (target / relative).exists():
                counts["kept"] += 1
            else:
                copy(item)
                counts["copied"] += 1
    return counts


def parse_with_preset(parser: argparse.ArgumentParser, presets: dict[str, dict[str, Any]],
                      argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the values of the ``--preset`` it names as the defaults (a flag given wins)."""
    parser.set_defaults(**presets[parser.parse_known_args(argv)[0].preset])
    return parser.parse_args(argv)


def trainer_flags(args: argparse.Namespace, subject: Subject, method: str, flags: list[str],
                  output_dir: Path) -> list[str]:
    """The subject trainer's flags for one method's run (the benchmark's settings, then ``flags``)."""
    command = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
               "--instance_data_dir", str(subject.directory),
               "--instance_prompt", args.instance_prompt,
               "--adapter", method, *flags,
               "--max_train_steps", str(args.max_train_steps),
               "--train_batch_size", str(args.train_batch_size),
               "--seed", str(args.seed),
               "--mixed_precision", args.mixed_precision,
               "--checkpointing_steps", str(args.checkpointing_steps),
               "--report_to", "none",
               "--skip_final_inference",
               "--no_recipe",  # every method on the benchmark's own, comparable settings
               "--output_dir", str(output_dir)]
    if args.learning_rate is not None:
        command += ["--learning_rate", str(args.learning_rate)]
    if args.resolution is not None:
        command += ["--resolution", str(args.resolution)]
    if args.with_prior_preservation:
        command += ["--with_prior_preservation", "--class_data_dir", str(args.class_data_dir),
                    "--class_prompt", args.class_prompt, "--num_class_images", str(args.num_class_images)]
    if any(output_dir.glob("checkpoint-*")):
        command += ["--resume_from_checkpoint", "latest"]
    return command + shlex.split(args.train_args)


def trainer_command(args: argparse.Namespace, subject: Subject, method: str, flags: list[str],
                    output_dir: Path) -> list[str]:
    """The process that trains one method: ``python -m difftune.commands.train_subject`` and its flags."""
    return [sys.executable, "-m", TRAINER_MODULE, *trainer_flags(args, subject, method, flags, output_dir)]


def train_method(args: argparse.Namespace, subject: Subject, method: str, flags: list[str],
                 output_dir: Path | None = None) -> dict[str, Any]:
    """Run the trainer unless its adapter and summary exist; returns the training summary.

    ``output_dir`` defaults to ``<--output_dir>/train/<method>``."""
    output_dir = output_dir or args.output_dir / "train" / method
    command = trainer_command(args, subject, method, flags, output_dir)
    return run_trainer(command, output_dir, method, retrain=args.retrain, quiet=getattr(args, "quiet", False))


def run_trainer(command: list[str], output_dir: Path, label: str, retrain: bool = False,
                quiet: bool = False) -> dict[str, Any]:
    """Run a trainer command (``python -m difftune.commands.<trainer> ...`` writing into ``output_dir``)
    unless its adapter and summary exist; its output goes to ``output_dir/train.log`` (the progress bar
    also here unless ``quiet``). Returns the training summary with the wall time, the CPU time and the
    peak RSS of the process."""
    adapter, summary_file = output_dir / ADAPTER_FILE, output_dir / SUMMARY_FILE
    if adapter.is_file() and summary_file.is_file() and not retrain:
        if not quiet:
            print(f"{label}: trained already ({adapter}), not retrained")
        return json.loads(summary_file.read_text())
    if retrain:
        adapter.unlink(missing_ok=True)
        summary_file.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "train.log"
    if not quiet:
        print(f"{label}: training, log in {log}\n  {shlex.join(command)}")
    start = time.perf_counter()
    with open(log, "ab") as handle:
        handle.write(f"$ {shlex.join(command)}\n".encode())
        handle.flush()
        # the trainer imports the difftune this process runs (a checkout, an editable install or a wheel)
        package_parent = str(Path(difftune.__file__).resolve().parent.parent)
        python_path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path}
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.PIPE, env=env)
        # the trainer's progress bar (stderr) shows here live and is kept in the log
        while chunk := process.stderr.read1(4096):
            handle.write(chunk)
            if not quiet:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
        process.stderr.close()
        peak_rss = cpu_seconds = None
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(process.pid, 0)
            cpu_seconds = usage.ru_utime + usage.ru_stime
            process.returncode = os.waitstatus_to_exitcode(status)
            peak_rss = usage.ru_maxrss * 1024  # Linux reports KiB
        else:
            process.wait()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise DifftuneError(f"training {label} failed (exit code {process.returncode}); "
                            f"end of {log}:\n{tail}")
    if not summary_file.is_file():
        raise DifftuneError(f"the trainer wrote no {summary_file}")
    summary = json.loads(summary_file.read_text())
    summary["wall_time_s"] = wall
    summary["process_peak_rss_bytes"] = peak_rss
    summary["process_cpu_seconds"] = cpu_seconds  # the CPU time it took, whatever else ran beside it
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
