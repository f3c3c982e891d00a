"""difftune.training.checkpointing on its own: a checkpoint read back equals what was saved, a save
that fails leaves no checkpoint, and a checkpoint resumes only the run that wrote it."""

import json
import random
import re

import numpy as np
import pytest
import torch
from conftest import TinyNet, campaign_size

import difftune
from difftune.errors import DifftuneError
from difftune.training import checkpointing


class OneProcess:
    """What save_checkpoint uses of an Accelerator, for one process."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def trained(seed: int, steps: int):
    """A LoRA-adapted TinyNet, its AdamW and schedule after ``steps`` steps."""
    torch.manual_seed(seed)
    model = TinyNet()
    difftune.add_adapter(model, "lora", targets=["to_q", "to_k"], rank=2)
    optimizer = torch.optim.AdamW(difftune.trainable_parameters(model), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(steps):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def save(tmp_path, step, model, optimizer, scheduler, **kwargs):
    state = {"seed": 3, "samples_seen": 12}
    return checkpointing.save_checkpoint(tmp_path, step, model=model, optimizer=optimizer,
                                         lr_scheduler=scheduler, trainer_state=state,
                                         accelerator=OneProcess(), base_model="tiny", **kwargs)


def test_a_checkpoint_read_back_equals_the_saved_state(tmp_path):
    model, optimizer, scheduler = trained(0, 3)
    path = save(tmp_path, 3, model, optimizer, scheduler)
    assert path == tmp_path / "checkpoint-3" and checkpointing.list_checkpoints(tmp_path) == [path]

    fresh, fresh_optimizer, fresh_scheduler = trained(1, 0)  # another init, no optimizer state
    before = {k: v.clone() for k, v in difftune.get_adapter(fresh).adapter_state_dict().items()}
    checkpointing.load_adapter_state(path, fresh)
    checkpointing.load_optimizer_state(path, fresh_optimizer, fresh_scheduler)

    saved = difftune.get_adapter(model).adapter_state_dict()
    loaded = difftune.get_adapter(fresh).adapter_state_dict()
    assert saved.keys() == loaded.keys()
    assert any(not torch.equal(before[k], loaded[k]) for k in saved)  # the load changed something
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    for group, fresh_group in zip(optimizer.param_groups, fresh_optimizer.param_groups, strict=True):
        assert group["lr"] == fresh_group["lr"] == 1e-2 * 0.5 ** 3
    for p, q in zip(difftune.trainable_parameters(model), difftune.trainable_parameters(fresh), strict=True):
        state, fresh_state = optimizer.state[p], fresh_optimizer.state[q]
        assert int(state["step"]) == int(fresh_state["step"]) == 3
        assert torch.equal(state["exp_avg"], fresh_state["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], fresh_state["exp_avg_sq"])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    trainer_state = checkpointing.read_trainer_state(path)
    assert trainer_state == {"seed": 3, "samples_seen": 12, "step": 3, "num_processes": 1}


def test_the_random_state_of_a_checkpoint_continues_the_same_draws(tmp_path):
    model, optimizer, scheduler = trained(0, 1)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert checkpointing.load_rng_state(path, 0)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])
    assert not checkpointing.load_rng_state(path, 1)  # no state for a process that did not exist


def test_a_save_that_fails_midway_leaves_no_checkpoint_and_the_previous_one_counts(tmp_path, monkeypatch):
    model, optimizer, scheduler = trained(0, 2)
    first = save(tmp_path, 1, model, optimizer, scheduler)
    original = checkpointing.save_state

    def fail_on_scheduler(path, value):
        if path.name.startswith("scheduler"):
            raise RuntimeError("disk gone")
        original(path, value)

    monkeypatch.setattr(checkpointing, "save_state", fail_on_scheduler)
    with pytest.raises(RuntimeError, match="disk gone"):
        save(tmp_path, 2, model, optimizer, scheduler)
    assert not (tmp_path / "checkpoint-2").exists()
    assert checkpointing.list_checkpoints(tmp_path) == [first]
    assert checkpointing.resolve_checkpoint(tmp_path, "latest") == first
    staging = tmp_path / ".checkpoint-2.tmp"
    assert (staging / "adapter.safetensors").is_file()  # what the failed save had written ...
    assert checkpointing.remove_incomplete(tmp_path) == [staging]  # ... goes at the next start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_the_total_limit_keeps_the_newest_checkpoints(tmp_path):
    model, optimizer, scheduler = trained(0, 1)
    for step in (1, 2, 3):
        save(tmp_path, step, model, optimizer, scheduler, total_limit=2)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(tmp_path):
    spec = difftune.AdapterSpec("lora", ("to_q", "to_k"), {"rank": 2})
    settings = {"base_model": "tiny", **spec.to_dict()}
    # what a checkpoint records goes through JSON (the targets tuple comes back as a list) and still fits
    state = json.loads(json.dumps({**settings, "seed": 3, "step": 2}))
    checkpointing.check_resume_fits(state, settings, tmp_path)
    for key, other in (("base_model", "other"), ("adapter_options", {"rank": 4}), ("targets", ["to_q"]),
                       ("method", "svfit")):
        with pytest.raises(DifftuneError, match=f"it was trained with {key} .*this run asks for"):
            checkpointing.check_resume_fits(state, {**settings, key: other}, tmp_path)


CHECKPOINT_MUTATIONS = campaign_size(200, 50)


def _mutate_checkpoint(folder, rng: random.Random) -> str:
    """One seeded damage to one file of a checkpoint folder; returns its kind."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    kind = rng.choice(["bit flip", "byte edit", "truncate", "append", "delete", "json edit"])
    if kind == "json edit" and target.suffix != ".json":
        kind = "bit flip"
    if kind == "bit flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "byte edit":
        position = rng.randrange(len(data))
        data[position] = (data[position] + rng.randrange(1, 256)) % 256
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "append":
        data += b" "
    elif kind == "delete":
        target.unlink()
        return f"{kind} {target.name}"
    else:  # a digit of a number changed, as a hand edit of "step": 30 → 20 would
        text = data.decode()
        digits = [i for i, c in enumerate(text) if c.isdigit()]
        position = rng.choice(digits)
        text = text[:position] + str((int(text[position]) + rng.randrange(1, 10)) % 10) + text[position + 1:]
        data = bytearray(text.encode())
    target.write_bytes(bytes(data))
    return f"{kind} {target.name if not target.name.startswith('rng_state') else 'rng_state'}"


def test_every_damaged_checkpoint_is_refused_naming_the_file_and_latest_falls_back(tmp_path):
    """Seeded single damages to every file of a checkpoint (bit flips, edits, cuts, a deleted file,
    a digit changed in the JSON): each is refused, by name, before anything loads; `latest` then
    resumes the older intact checkpoint. The counts by kind are printed."""
    import shutil
    from collections import Counter

    model, optimizer, scheduler = trained(0, 2)
    older = save(tmp_path / "out", 2, model, optimizer, scheduler)
    pristine = save(tmp_path / "pristine", 3, model, optimizer, scheduler)
    rng = random.Random("checkpoint-fuzz")
    kinds: Counter = Counter()
    for _ in range(CHECKPOINT_MUTATIONS):
        damaged = tmp_path / "out" / "checkpoint-3"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(pristine, damaged)
        kind = _mutate_checkpoint(damaged, rng)
        try:
            checkpointing.resolve_checkpoint(tmp_path / "out", str(damaged))
        except DifftuneError as err:
            assert re.search(r"checkpoint-3: (not a complete|a damaged) checkpoint: ", str(err)), (kind, err)
            assert "\n" not in str(err)
        else:  # only a change that means nothing may pass: whitespace added to the marker
            assert kind == f"append {checkpointing.COMPLETE_MARKER}", kind
            assert json.loads((damaged / checkpointing.COMPLETE_MARKER).read_text()) == json.loads(
                (pristine / checkpointing.COMPLETE_MARKER).read_text())
            kinds["harmless"] += 1
            continue
        with pytest.warns(UserWarning, match="resuming from checkpoint-2, the newest intact") \
                if checkpointing.incomplete_reason(damaged) is None else _no_warning():
            assert checkpointing.resolve_checkpoint(tmp_path / "out", "latest") == older
        kinds[kind.split(" ")[0]] += 1
    print(f"checkpoint damage: {CHECKPOINT_MUTATIONS} mutations; refused by kind, and harmless: "
          f"{dict(sorted(kinds.items()))}")


class _no_warning:  # an incomplete checkpoint is not listed at all: latest finds the older one silently
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
