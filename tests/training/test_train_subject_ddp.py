"""Two CPU processes under `accelerate launch` (DDP over gloo) against one process, and the
teardown order that keeps such a run from hanging at exit."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch
from conftest import ROOT, TRAIN_SUBJECT
from safetensors.torch import load_file

from difftune.training import loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launch(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run an `accelerate launch`; if it hangs, fail with every worker's Python stack.

    The trainers print their stacks on SIGUSR1 (loop.enable_stack_dumps): on timeout each
    worker is asked in turn, then the launcher is stopped (it stops its workers), and
    whatever is left is killed.
    """
    import psutil  # an accelerate dependency

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(process.pid)
        workers = launcher.children()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.send_signal(signal.SIGUSR1)
            time.sleep(2)  # one dump at a time, not interleaved
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for leftover in {*workers, *launcher.children(), launcher}:
                with contextlib.suppress(psutil.NoSuchProcess):
                    leftover.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"the launch hung for {timeout} s ({len(workers)} workers); output and stacks:\n"
                    f"{stdout[-3000:]}\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_processes_end_identical_and_match_one_process_with_the_same_global_batch(
        train_subject, subject_dir, tmp_path):
    common = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", str(subject_dir),
              "--instance_prompt", "a photo of sks disc", "--max_train_steps", "3",
              "--checkpointing_steps", "3",
              "--learning_rate", "1e-3", "--random_flip", "--seed", "0", "--report_to", "none",
              # Adam's first updates are ~sign(g): a gradient entry near 0 flips with the order
              # of float sums. A large epsilon keeps the update continuous in g.
              "--adam_epsilon", "1e-2",
              "--skip_final_inference"]
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    # ACCELERATE_USE_CPU makes accelerate run the processes on CPU with the gloo backend
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    two_process_run = [*launch, TRAIN_SUBJECT, *common, "--train_batch_size", "1", "--output_dir", str(two)]
    result = run_launch(two_process_run, env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter identical on all 2 processes" in result.stdout
    assert "3 steps x 2 images (batch 1 x 2 processes x 1 accumulation)" in result.stdout
    rng_files = {p.name for p in (two / "checkpoint-3").glob("rng_state_*")}
    assert rng_files == {"rng_state_0.safetensors", "rng_state_1.safetensors"}

    train_subject(*common, "--train_batch_size", "2", "--output_dir", one)
    distributed, single = load_file(two / "adapter.safetensors"), load_file(one / "adapter.safetensors")
    assert distributed.keys() == single.keys()
    for key in single:
        # Same samples and noise; only the order of float sums differs. A different batch
        # or noise moves every tensor by its whole scale.
        scale = single[key].abs().max()
        assert (distributed[key] - single[key]).abs().max() <= 1e-3 * scale, key
    assert any(k.endswith("lora_B.weight") and single[k].abs().sum() > 0 for k in single)


def test_a_running_trainer_prints_its_stacks_on_sigusr1_and_carries_on():
    script = ("from difftune.training.loop import enable_stack_dumps\n"
              "import time\n"
              "enable_stack_dumps()\n"
              "def waiting_for_a_collective():\n"
              "    print('ready', flush=True)\n"  # inside: the signal cannot come before the call
              "    time.sleep(2)\n"
              "waiting_for_a_collective()\n"
              "print('carried on', flush=True)\n")
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": ROOT},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "carried on" in stdout
    assert "in waiting_for_a_collective" in stderr


class RecordingAccelerator:
    """What loop.end_training uses of an Accelerator; its end_training, where accelerate
    destroys the process group, records whether the DDP model still lived."""

    num_processes = 2

    def __init__(self, model_ref: weakref.ref):
        self.model_ref, self.model_alive_at_end = model_ref, None

    def wait_for_everyone(self) -> None:
        pass

    def end_training(self) -> None:
        self.model_alive_at_end = self.model_ref() is not None


@pytest.fixture
def one_process_gloo_group():
    """A real process group for real DDP wrappers, destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp_linear() -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))


def test_end_training_collects_a_dropped_ddp_model_before_the_process_group_goes(one_process_gloo_group):
    ddp_model = ddp_linear()
    accelerator = RecordingAccelerator(weakref.ref(ddp_model))
    cycle = [ddp_model]
    cycle.append(cycle)  # only the garbage collector frees it
    del ddp_model, cycle
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop.end_training(accelerator)
    assert accelerator.model_alive_at_end is False


def test_end_training_warns_when_the_caller_still_holds_the_ddp_model(one_process_gloo_group):
    ddp_model = ddp_linear()
    accelerator = RecordingAccelerator(weakref.ref(ddp_model))
    with pytest.warns(RuntimeWarning, match="outlives training"):
        loop.end_training(accelerator)
    assert accelerator.model_alive_at_end is True
