"""One trainer per --output_dir: a second one is refused naming the folder and the first; a killed
holder's lock does not block."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TRAIN_SUBJECT

import difftune.model_factory
from difftune import locking
from difftune.errors import DifftuneError
from difftune.training import checkpointing


def flags(subject_dir, out, steps):
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", str(subject_dir),
            "--instance_prompt", "a photo of sks disc", "--output_dir", str(out),
            "--max_train_steps", str(steps), "--report_to", "none", "--seed", "0", "--skip_final_inference",
            "--checkpointing_steps", "1"]


def wait_for_holder(lock_file, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the first trainer ended early"
        if lock_file.is_file() and lock_file.read_text().strip():
            return json.loads(lock_file.read_text())
        time.sleep(0.05)
    raise AssertionError("the first trainer never took its folder")


def test_a_second_trainer_on_a_running_trainers_folder_is_refused(train_subject, subject_dir, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, TRAIN_SUBJECT, *flags(subject_dir, out, 100000)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        owner = wait_for_holder(out / locking.LOCK_FILE_NAME, first)
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        message = (rf"--output_dir {out.resolve()} is in use by another training run \(pid {first.pid} on "
                   r".*train_subject.py .*\); wait for it to end, or choose another --output_dir$")
        with monkeypatch.context() as patch:
            patch.setattr(difftune.model_factory, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
            with pytest.raises(DifftuneError, match=message):
                train_subject(*flags(subject_dir, out, 1))
        os.kill(first.pid, signal.SIGKILL)  # a killed holder leaves its lock file behind ...
        first.wait(timeout=60)
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / locking.LOCK_FILE_NAME).read_text())["pid"] == first.pid
    done = checkpointing.list_checkpoints(out)
    train_subject(*flags(subject_dir, out, 1 + (checkpointing.checkpoint_step(done[-1]) if done else 0)),
                  "--resume_from_checkpoint", "latest")  # ... which does not block the next run
    assert (out / "adapter.safetensors").is_file()


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "_try_lock", lambda handle: None)  # a file system without flock
    folder = tmp_path / "run"
    folder.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_file = folder / locking.LOCK_FILE_NAME
    lock_file.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    lock = locking.lock_output_dir(folder)  # the recorded holder no longer runs
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert locking.lock_output_dir(folder) is lock  # this process again: the same lock
    lock.release()
    lock_file.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "x"}))
    with pytest.raises(DifftuneError, match=rf"is in use by another training run \(pid {os.getppid()} on "):
        locking.lock_output_dir(folder)
