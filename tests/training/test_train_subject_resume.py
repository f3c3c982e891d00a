"""Checkpoints of the subject trainer: exact resume, atomic writes, killed runs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TRAIN_SUBJECT, interrupt_after_first_checkpoint
from safetensors.torch import load_file

import difftune
from difftune.model_factory import load_pipeline
from difftune.training import checkpointing

MODELS = {"sd": "builtin:tiny-sd", "sdxl": "builtin:tiny-sdxl", "sd3": "builtin:tiny-sd3",
          "flux": "builtin:tiny-flux"}


def run_flags(subject_dir, out, model, method, steps=4):
    # everything that carries state across steps: Adam moments, a warm-up + cosine schedule,
    # random flips and crops, accumulation, and (LoRA) dropout drawn from the global generator
    extra = ["--lora_dropout", "0.2"] if method == "lora" else []
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--adapter", method,
            "--max_train_steps", steps, "--checkpointing_steps", 2, "--lr_scheduler", "cosine",
            "--lr_warmup_steps", 1, "--learning_rate", 1e-3, "--random_flip",
            "--gradient_accumulation_steps", 2,
            "--seed", 11, "--report_to", "none", "--skip_final_inference", *extra]


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
@pytest.mark.parametrize("family", list(MODELS))
def test_interrupted_and_resumed_run_ends_bit_identical(train_subject, subject_dir, tmp_path, monkeypatch,
                                                        family, method):
    full, split = tmp_path / "full", tmp_path / "split"
    train_subject(*run_flags(subject_dir, full, MODELS[family], method))
    with monkeypatch.context() as patch:
        interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            train_subject(*run_flags(subject_dir, split, MODELS[family], method))
    assert not (split / "adapter.safetensors").exists()
    assert [p.name for p in checkpointing.list_checkpoints(split)] == ["checkpoint-2"]
    train_subject(*run_flags(subject_dir, split, MODELS[family], method),
                  "--resume_from_checkpoint", "latest")

    uninterrupted, resumed = load_file(full / "adapter.safetensors"), load_file(split / "adapter.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    assert any(not torch.equal(uninterrupted[k], load_file(split / "checkpoint-2" / "adapter.safetensors")[k])
               for k in uninterrupted)  # the second half did change the adapter
    for name in ("optimizer.safetensors", "scheduler.safetensors"):
        a = checkpointing.load_state(full / "checkpoint-4" / name)
        b = checkpointing.load_state(split / "checkpoint-4" / name)
        assert str(a) == str(b)


def test_latest_skips_incomplete_saves_and_total_limit(tmp_path):
    for step in (2, 4, 10, 16):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / checkpointing.TRAINER_STATE).write_text("{}")
        (folder / "adapter.safetensors").write_bytes(b"x" * 10)
        files = {"trainer_state.json": 2, "adapter.safetensors": 10}
        (folder / checkpointing.COMPLETE_MARKER).write_text(json.dumps({"files": files}))
    (tmp_path / "checkpoint-12").mkdir()  # no marker: never finished
    (tmp_path / "checkpoint-12" / checkpointing.TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-16" / "adapter.safetensors").unlink()  # half deleted (pruning killed)
    (tmp_path / "checkpoint-4" / "adapter.safetensors").write_bytes(b"x")  # cut short
    (tmp_path / ".checkpoint-14.tmp").mkdir()
    (tmp_path / ".checkpoint-1.pruned.tmp").mkdir()
    (tmp_path / ".adapter.safetensors.k2j4.tmp").write_bytes(b"partial")  # a killed atomic_write
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / ".step-000002.png.a1b2.tmp").write_bytes(b"partial")
    (tmp_path / "keep.tmp").write_text("not ours")
    assert checkpointing.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
    names = [p.name for p in checkpointing.list_checkpoints(tmp_path)]
    assert names == [f"checkpoint-{s}" for s in (2, 10)]
    assert checkpointing.remove_incomplete(tmp_path) == [
        tmp_path / ".checkpoint-1.pruned.tmp", tmp_path / ".checkpoint-14.tmp",
        tmp_path / ".adapter.safetensors.k2j4.tmp", tmp_path / "validation" / ".step-000002.png.a1b2.tmp"]
    assert (tmp_path / "keep.tmp").exists()
    assert checkpointing.resolve_checkpoint(tmp_path / "empty", "latest") is None
    for step, reason in ((12, "no readable checkpoint_complete.json"),
                         (16, "adapter.safetensors is missing or has another size"),
                         (4, "adapter.safetensors is missing or has another size")):
        with pytest.raises(difftune.DifftuneError, match=f"not a complete checkpoint: {reason}"):
            checkpointing.resolve_checkpoint(tmp_path, str(tmp_path / f"checkpoint-{step}"))


def test_a_checkpoint_pruning_killed_midway_never_counts_and_leftovers_go(train_subject, subject_dir,
                                                                          tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".adapter.safetensors.x1y2.tmp").write_bytes(b"left by a killed save")
    monkeypatch.setattr(checkpointing.shutil, "rmtree", lambda *args, **kwargs: None)  # killed mid-delete
    train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=2),
                  "--checkpointing_steps", 1, "--checkpoints_total_limit", 1)
    monkeypatch.undo()
    assert not (out / ".adapter.safetensors.x1y2.tmp").exists()
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-1").exists() and (out / ".checkpoint-1.pruned.tmp").is_dir()
    assert checkpointing.remove_incomplete(out) == [out / ".checkpoint-1.pruned.tmp"]


def test_a_failing_save_leaves_the_previous_checkpoint_intact(train_subject, subject_dir, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    original = checkpointing.save_state

    def failing_second_optimizer_save(path, value):
        if "optimizer" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
        return original(path, value)

    monkeypatch.setattr(checkpointing, "save_state", failing_second_optimizer_save)
    with pytest.raises(OSError, match="disk full"):
        train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=4))
    monkeypatch.undo()
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-2"]
    assert checkpointing.resolve_checkpoint(out, "latest") == out / "checkpoint-2"
    assert list(out.glob(".checkpoint-4.tmp"))  # the half-written one, ignored and removed on restart
    pipe = load_pipeline("builtin:tiny-sd")
    difftune.load_adapter(pipe, out / "checkpoint-2")  # a checkpoint folder is an adapter folder


def test_training_states_round_trip_exactly_through_safetensors(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95))
    sum(p.sum() for p in params).backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "mixed": [1, 2.5, None, True, "x", (1, (2, 3))],
             "bf16": torch.ones(2, dtype=torch.bfloat16), "ints": {7: torch.arange(3), "k": float("inf")}}
    checkpointing.save_state(tmp_path / "s.safetensors", state)
    back = checkpointing.load_state(tmp_path / "s.safetensors")
    assert str(back) == str(state)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert list(back["optimizer"]["state"]) == [0, 1] and back["ints"][7].dtype == torch.int64
    moments = back["optimizer"]["state"][1]["exp_avg_sq"]
    assert torch.equal(moments, state["optimizer"]["state"][1]["exp_avg_sq"])
    again = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    again.load_state_dict(back["optimizer"])
    assert str(again.state_dict()) == str(optimizer.state_dict())


def test_a_damaged_optimizer_state_is_refused_naming_it_before_the_model_loads(train_subject, subject_dir,
                                                                              tmp_path, monkeypatch):
    import difftune.model_factory

    out = tmp_path / "out"
    train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=1),
                  "--checkpointing_steps", 1)
    state_file = out / "checkpoint-1" / "optimizer.safetensors"
    data = state_file.read_bytes()
    state_file.write_bytes(data[:8] + b"{" * 40 + data[48:])  # same size: the marker still lists it
    monkeypatch.setattr(difftune.model_factory, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(difftune.DifftuneError, match=r"every checkpoint in .* is damaged \(.*checkpoint-1/"
                                                     r"optimizer.safetensors does not match the checksum"):
        train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=2),
                      "--resume_from_checkpoint", "latest")
    # a checkpoint written before the checksums: the state file itself is read and refused
    marker = out / "checkpoint-1" / checkpointing.COMPLETE_MARKER
    marker.write_text(json.dumps({"files": json.loads(marker.read_text())["files"]}))
    with pytest.raises(difftune.DifftuneError, match=r"checkpoint file .*checkpoint-1/optimizer.safetensors "
                                                     r"is damaged \(truncated or not a difftune state\)"):
        train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=2),
                      "--resume_from_checkpoint", "latest")
    assert not list(out.glob("checkpoint-1/*.pt"))  # no pickle is written, none would be read


def interrupt_after_checkpoint(monkeypatch, step):
    """Make the run die right after it has written checkpoint ``step``."""
    original = checkpointing.save_checkpoint

    def save_then_die(output_dir, at, **kwargs):
        path = original(output_dir, at, **kwargs)
        if at == step:
            raise KeyboardInterrupt("simulated interruption")
        return path

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)


def flip_an_exponent_bit(path):
    """One bit of the first float's exponent in a safetensors file: same size, header intact."""
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_edited_checkpoint_files_are_refused_and_latest_falls_back_to_an_intact_one(
        train_subject, subject_dir, tmp_path, monkeypatch):
    import difftune.model_factory

    full, split = tmp_path / "full", tmp_path / "split"
    flags = ["--checkpointing_steps", 1]
    train_subject(*run_flags(subject_dir, full, "builtin:tiny-sd", "lora", steps=4), *flags)
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            train_subject(*run_flags(subject_dir, split, "builtin:tiny-sd", "lora", steps=4), *flags)
    state = split / "checkpoint-3" / checkpointing.TRAINER_STATE
    assert '"step": 3' in state.read_text()
    state.write_text(state.read_text().replace('"step": 3', '"step": 2'))  # one character
    flip_an_exponent_bit(split / "checkpoint-2" / "optimizer.safetensors")
    with monkeypatch.context() as patch:
        patch.setattr(difftune.model_factory, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
        for step, name in ((3, "trainer_state.json"), (2, "optimizer.safetensors")):
            message = (rf"--resume_from_checkpoint .*checkpoint-{step}: a damaged checkpoint: "
                       rf".*checkpoint-{step}/{name} does not match the checksum written with it")
            with pytest.raises(difftune.DifftuneError, match=message):
                train_subject(*run_flags(subject_dir, split, "builtin:tiny-sd", "lora", steps=4), *flags,
                              "--resume_from_checkpoint", split / f"checkpoint-{step}")
    with pytest.warns(UserWarning, match=r"resuming from checkpoint-1, the newest intact checkpoint; "
                                         r"skipped: .*checkpoint-3/trainer_state.json .*; .*checkpoint-2/"):
        train_subject(*run_flags(subject_dir, split, "builtin:tiny-sd", "lora", steps=4), *flags,
                      "--resume_from_checkpoint", "latest")
    uninterrupted, resumed = load_file(full / "adapter.safetensors"), load_file(split / "adapter.safetensors")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_a_disk_too_small_for_the_checkpoints_is_warned_about_before_training(train_subject, subject_dir,
                                                                              tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.warns(UserWarning, match=r"take up to 0.0\d GiB, the disk has 0.00 GiB free; raise "
                                         "--checkpointing_steps or set --checkpoints_total_limit"):
        train_subject(*run_flags(subject_dir, tmp_path / "out", "builtin:tiny-sd", "lora", steps=1),
                      "--checkpointing_steps", 1, "--skip_final_inference")
    assert checkpointing.estimated_bytes(1000, 100, 10, None) == 10 * (12000 + 2**20) + 4000
    assert checkpointing.estimated_bytes(1000, 100, 10, 2) == 3 * (12000 + 2**20) + 4000


def test_rng_state_round_trip():
    import random

    checkpointing.restore_rng_state(state := checkpointing.capture_rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(1)
    checkpointing.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_killed_run_leaves_a_loadable_checkpoint_and_resumes(train_subject, subject_dir, tmp_path, capsys):
    """A real SIGKILL of a plain `python` run, then load and resume from what it left."""
    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", str(subject_dir),
             "--instance_prompt", "a photo of sks disc", "--output_dir", str(out),
             "--checkpointing_steps", "1",
             "--report_to", "none", "--seed", "0", "--skip_final_inference"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, TRAIN_SUBJECT, *flags, "--max_train_steps", "100000"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while len(checkpointing.list_checkpoints(out)) < 3 and time.time() < deadline:
            assert process.poll() is None, "the training run ended early"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    latest = checkpointing.resolve_checkpoint(out, "latest")
    assert latest is not None
    pipe = load_pipeline("builtin:tiny-sd")
    difftune.load_adapter(pipe, latest)
    step = checkpointing.read_trainer_state(latest)["step"]
    capsys.readouterr()
    train_subject(*flags, "--max_train_steps", step + 1, "--resume_from_checkpoint", "latest")
    assert f"resumed at step {step}" in capsys.readouterr().out
    assert not list(out.glob(".checkpoint-*.tmp"))
    newest = checkpointing.resolve_checkpoint(out, "latest")
    assert checkpointing.read_trainer_state(newest)["step"] == step + 1


@pytest.mark.parametrize("where", ["checkpoint staging", "checkpoint file", "final adapter"])
def test_a_file_system_turning_read_only_mid_run_is_one_line_and_loses_nothing(train_subject, subject_dir,
                                                                               tmp_path, monkeypatch, where):
    import errno
    from pathlib import Path

    from difftune import io as difftune_io

    out = tmp_path / "out"
    read_only = OSError(errno.EROFS, "Read-only file system")
    mkdir, mkstemp = Path.mkdir, difftune_io.tempfile.mkstemp

    def refusing_mkdir(self, *args, **kwargs):
        if self.name == ".checkpoint-2.tmp":
            raise read_only
        return mkdir(self, *args, **kwargs)

    def refusing_mkstemp(*args, prefix="", dir=None, **kwargs):
        staging = where == "checkpoint file" and Path(dir).name == ".checkpoint-2.tmp"
        final = where == "final adapter" and prefix.startswith(".adapter.safetensors") and Path(dir) == out
        if staging or final:
            raise read_only
        return mkstemp(*args, prefix=prefix, dir=dir, **kwargs)

    if where == "checkpoint staging":
        monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    else:
        monkeypatch.setattr(difftune_io.tempfile, "mkstemp", refusing_mkstemp)
    message = r"out/(\.checkpoint-2\.tmp.*|adapter.safetensors): cannot write: Read-only file system$"
    with pytest.raises(difftune.DifftuneError, match=message) as error:
        train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=2),
                      "--checkpointing_steps", 1)
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    newest = checkpointing.resolve_checkpoint(out, "latest")
    assert newest.name == ("checkpoint-2" if where == "final adapter" else "checkpoint-1")
    difftune.load_adapter(load_pipeline("builtin:tiny-sd"), newest)  # what was saved before still loads


def test_resuming_with_other_optimisation_settings_is_refused_naming_them(train_subject, subject_dir,
                                                                         tmp_path, monkeypatch):
    import difftune.model_factory

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=4))
    with monkeypatch.context() as patch:
        patch.setattr(difftune.model_factory, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
        message = (r"checkpoint-2: it was trained with --learning_rate 0.001 \(this run: 0.01\), "
                   r"--adam_beta2 0.999 \(this run: 0.99\); its optimizer and schedule state hold")
        with pytest.raises(difftune.DifftuneError, match=message):
            train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=4),
                          "--learning_rate", 1e-2, "--adam_beta2", 0.99, "--resume_from_checkpoint", "latest")
    # the same settings resume, and a run may be extended
    train_subject(*run_flags(subject_dir, out, "builtin:tiny-sd", "lora", steps=6),
                  "--resume_from_checkpoint", "latest")
    card = (out / "README.md").read_text()
    assert "| learning rate | `0.001` |" in card and "| optimizer steps | 6 |" in card


def test_training_on_top_of_frozen_adapters_resumes_bit_identical(train_subject, subject_dir, tmp_path,
                                                                   monkeypatch, capsys):
    # two frozen bases of other methods (one with text-encoder adapters), the trained LoRA on top of them
    from conftest import build, randomize_adapter

    bases = []
    for name, method, options in (("style", "sara", {"budget": 0.02}), ("pose", "svfit", {"rank": 2})):
        pipe = build("sd")
        difftune.add_adapter(pipe, method, "attn", **options)
        if name == "style":
            difftune.add_adapter(pipe.text_encoder, method, r".*q_proj", **options)
            randomize_adapter(pipe.text_encoder, std=0.01)
        randomize_adapter(pipe, std=0.01)
        bases.append(difftune.save_adapter(pipe, tmp_path / f"{name}.safetensors"))
    flags = ["--base_adapter", f"{bases[0]}:0.7", "--base_adapter", str(bases[1])]
    full, split = tmp_path / "full", tmp_path / "split"
    train_subject(*run_flags(subject_dir, full, MODELS["sd"], "lora"), *flags)
    assert "| on top of frozen style.safetensors x0.7, pose.safetensors x1" in capsys.readouterr().out
    with monkeypatch.context() as patch:
        interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            train_subject(*run_flags(subject_dir, split, MODELS["sd"], "lora"), *flags)
    with pytest.raises(difftune.DifftuneError, match="trained with base_adapters .*style.safetensors"):
        train_subject(*run_flags(subject_dir, split, MODELS["sd"], "lora"), "--resume_from_checkpoint",
                      "latest")
    train_subject(*run_flags(subject_dir, split, MODELS["sd"], "lora"), *flags,
                  "--resume_from_checkpoint", "latest")
    uninterrupted, resumed = load_file(full / "adapter.safetensors"), load_file(split / "adapter.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)

    # the file holds the trained LoRA only, and records the bases it was trained on top of
    info = difftune.read_adapter_info(full / "adapter.safetensors")
    assert info["method"] == "lora" and all("lora" in key for key in uninterrupted)
    assert [(r["name"], r["method"], r["weight"]) for r in info["base_adapters"]] == [
        ("base_1", "sara", 0.7), ("base_2", "svfit", 1.0)]
    pipe = load_pipeline("builtin:tiny-sd")
    with pytest.warns(UserWarning, match="trained on top of the sara adapter"):
        difftune.load_adapter(pipe, full / "adapter.safetensors")
    # the bases were frozen: trained alone from the same seed, the LoRA comes out different
    train_subject(*run_flags(subject_dir, tmp_path / "alone", MODELS["sd"], "lora"))
    alone = load_file(tmp_path / "alone" / "adapter.safetensors")
    assert any(not torch.equal(alone[k], uninterrupted[k]) for k in alone)
