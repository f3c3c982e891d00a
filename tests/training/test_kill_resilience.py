"""SIGKILL at seeded random moments of training, checkpointing, pruning and the final save.

After every kill each checkpoint that counts must load (adapter and every state file); the next
start removes what the killed one left half-written; and the run resumed through all the kills
ends with the adapter of an uninterrupted run, bit for bit.
"""

import os
import random
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT, TRAIN_SUBJECT
from safetensors.torch import load_file

import difftune
from difftune.model_factory import load_pipeline
from difftune.training import checkpointing

KILLS = 6
STEPS = 30  # a killed start runs a few steps: room for every kill before the end


def trainer_flags(subject_dir, out):
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", str(subject_dir),
            "--instance_prompt", "a photo of sks disc", "--output_dir", str(out), "--max_train_steps",
            str(STEPS), "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--report_to", "none",
            "--seed", "0", "--skip_final_inference", "--resume_from_checkpoint", "latest"]


def latest_step(out) -> int:
    checkpoints = checkpointing.list_checkpoints(out)
    return checkpointing.checkpoint_step(checkpoints[-1]) if checkpoints else 0


def leftovers(out):
    return sorted(p.name for p in out.rglob("*.tmp"))


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_adapter(train_subject, subject_dir,
                                                                           tmp_path):
    reference = tmp_path / "reference"
    train_subject(*trainer_flags(subject_dir, reference))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    rng = random.Random(22)
    pipe = load_pipeline("builtin:tiny-sd")
    kills, finished = 0, False
    while not finished:
        process = subprocess.Popen([sys.executable, TRAIN_SUBJECT, *trainer_flags(subject_dir, out)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if kills < KILLS:  # let this start save a checkpoint, then kill it a random moment later
                start_step, deadline = latest_step(out), time.time() + 120
                while process.poll() is None and latest_step(out) == start_step and time.time() < deadline:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.5))
                assert process.poll() is None, "the run ended before it could be killed"
                os.kill(process.pid, signal.SIGKILL)
                kills += 1
            process.wait(timeout=240)
        finally:
            process.kill()
            process.wait()
        finished = process.returncode == 0
        for checkpoint in checkpointing.list_checkpoints(out):  # whatever counts must load
            checkpointing.check_states(checkpoint)
            difftune.load_adapter(pipe, checkpoint)
            difftune.remove_adapter(pipe)
    assert kills == KILLS
    assert leftovers(out) == []  # each start removed what the kill before it left
    final, expected = load_file(out / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [p.name for p in checkpointing.list_checkpoints(out)] == [f"checkpoint-{STEPS - 1}",
                                                                    f"checkpoint-{STEPS}"]
