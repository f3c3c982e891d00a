"""SIGKILL during training, inside a checkpoint save, during pruning and during the final save, for every
registered method.

Each start of the trainer is a process forked from a server that has imported the libraries already
(multiprocessing's forkserver), so a start costs a fraction of a second, not an import of torch and
diffusers. Most kills are placed exactly: the child kills itself right before the rename that would
finish a checkpoint file, a checkpoint's marker, a checkpoint folder, a pruning or the final adapter
file (what is on disk then is what a power cut there leaves); one more comes at a random moment of the
steps. After every kill each checkpoint that counts must be intact and load, the next start removes
what the killed one left, and the run resumed through all the kills ends with the adapter of an
uninterrupted run, bit for bit.
"""

import multiprocessing
import os
import random
import signal
import time

import kill_child
import pytest
import torch
from conftest import FULL_CAMPAIGN, ROOT
from safetensors.torch import load_file

import difftune
from difftune.model_factory import load_pipeline
from difftune.training import checkpointing

STEPS = 6
# where a start kills itself: (what, file or folder name, which occurrence); None: a random moment
KILLS = [
    None,
    ("replace", "optimizer.safetensors", 2),  # inside a checkpoint save, a state file written
    ("replace", "checkpoint_complete.json", 1),  # a checkpoint's marker written, not yet in place
    ("rename", ".checkpoint-", 1),  # a finished staging folder not yet renamed
    ("rmtree", ".pruned.tmp", 1),  # a pruned checkpoint renamed away, not yet deleted
    ("replace", "adapter.safetensors", "final"),  # the final adapter written, not yet in place
]


def kills_of(method: str) -> list:
    """The full campaign kills every method at every point; the suite's sample kills each method at a
    random moment and at one placed point, the points dealt round the methods so each is hit."""
    if FULL_CAMPAIGN:
        return KILLS
    placed = KILLS[1:]
    return [None, placed[sorted(difftune.METHODS).index(method) % len(placed)]]


OPTIONS = {"lora": ["--rank", "2"], "sara": ["--sara_budget", "0.02"], "svfit": ["--rank", "2"]}


def trainer_flags(subject_dir, out, method):
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", str(subject_dir),
            "--instance_prompt", "a photo of sks disc", "--output_dir", str(out), "--max_train_steps",
            str(STEPS), "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--report_to", "none",
            "--seed", "0", "--skip_final_inference", "--resume_from_checkpoint", "latest",
            "--adapter", method, *OPTIONS.get(method, [])]


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["kill_child"])
    return context


def latest_step(out) -> int:
    checkpoints = checkpointing.list_checkpoints(out)
    return checkpointing.checkpoint_step(checkpoints[-1]) if checkpoints else 0


def leftovers(out):
    return sorted(p.name for p in out.rglob("*.tmp"))


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
def test_runs_killed_anywhere_resume_to_the_uninterrupted_adapter(forkserver, train_subject, subject_dir,
                                                                  tmp_path, method, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    reference = tmp_path / "reference"
    train_subject(*trainer_flags(subject_dir, reference, method))
    out = tmp_path / "killed"
    rng = random.Random(f"kill-{method}")
    pipe = load_pipeline("builtin:tiny-sd")
    kills = kills_of(method)
    for kill in [*kills, "finish"]:
        placed = None if kill in (None, "finish") else kill
        process = forkserver.Process(target=kill_child.run_trainer,
                                     args=(trainer_flags(subject_dir, out, method), placed, str(out)))
        process.start()
        try:
            if kill is None:  # once a checkpoint more is written, a random moment later
                start_step, deadline = latest_step(out), time.time() + 120
                while process.is_alive() and latest_step(out) == start_step and time.time() < deadline:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.3))
                assert process.is_alive(), "the run ended before it could be killed"
                os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=240)
        finally:
            if process.is_alive():
                process.kill()
                process.join()
        expected_code = 0 if kill == "finish" else -signal.SIGKILL
        assert process.exitcode == expected_code, f"{method}, kill at {kill}: exit code {process.exitcode}"
        for checkpoint in checkpointing.list_checkpoints(out):  # whatever counts is intact and loads
            assert checkpointing.damaged_reason(checkpoint) is None, (kill, checkpoint)
            checkpointing.check_states(checkpoint)
            difftune.load_adapter(pipe, checkpoint)
            difftune.remove_adapter(pipe)
    assert leftovers(out) == []  # each start removed what the kill before it left
    final, expected = load_file(out / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected), f"{method}: not bit-identical"
    assert [p.name for p in checkpointing.list_checkpoints(out)] == [f"checkpoint-{STEPS - 1}",
                                                                    f"checkpoint-{STEPS}"]
    print(f"kills {method}: {len(kills)} kills ({len(kills) - 1} placed, 1 at a random moment), every "
          "counted checkpoint intact and loading after each, resumed bit-identical")
