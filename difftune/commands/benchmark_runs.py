"""What both benchmarks (`difftune benchmark`, with and without ``--suite``) share: one run of the
subject trainer per method, in a subprocess of its own (same data, steps, seed and batch for
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

# One colour per method in every plot.
METHOD_COLORS = {"base": "#7f7f7f", "lora": "#1f77b4", "sara": "#d62728", "svfit": "#2ca02c",
                 "tlora": "#9467bd"}


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
    adapter, summary_file = output_dir / ADAPTER_FILE, output_dir / SUMMARY_FILE
    if adapter.is_file() and summary_file.is_file() and not args.retrain:
        if not getattr(args, "quiet", False):
            print(f"{method}: trained already ({adapter}), not retrained")
        return json.loads(summary_file.read_text())
    if args.retrain:
        adapter.unlink(missing_ok=True)
        summary_file.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = trainer_command(args, subject, method, flags, output_dir)
    log = output_dir / "train.log"
    if not getattr(args, "quiet", False):
        print(f"{method}: training ({args.max_train_steps} steps), log in {log}\n  {shlex.join(command)}")
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
            if not getattr(args, "quiet", False):
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
        process.stderr.close()
        peak_rss = None
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            peak_rss = usage.ru_maxrss * 1024  # Linux reports KiB
        else:
            process.wait()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise DifftuneError(f"training {method} failed (exit code {process.returncode}); "
                            f"end of {log}:\n{tail}")
    if not summary_file.is_file():
        raise DifftuneError(f"the trainer wrote no {summary_file}")
    summary = json.loads(summary_file.read_text())
    summary["wall_time_s"] = wall
    summary["process_peak_rss_bytes"] = peak_rss
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
