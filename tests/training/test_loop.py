"""difftune.training.loop.train (the loop both trainers run) against a hand-written loop, the
AdapterSpec the trainers build once, and the settings built from the flags."""

import contextlib
import copy
import dataclasses

import pytest
import torch
from conftest import TinyNet, command_module

import difftune
from difftune.errors import DifftuneError
from difftune.training import arguments, checkpointing, loop, settings

DATA = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))


class Process:
    """What the loop uses of an Accelerator, as process ``rank`` of ``world`` (gradients are not
    averaged across processes: one process's view)."""

    scaler = None
    optimizer_step_was_skipped = False
    is_main_process = True

    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world
        self.device = torch.device("cpu")
        self.unsynced, self.logs = 0, []

    @contextlib.contextmanager
    def no_sync(self, model):
        self.unsynced += 1
        yield

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce(self, tensor, reduction):
        return tensor

    def log(self, values, step):
        self.logs.append((step, dict(values)))


def adapted(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    adapter = difftune.add_adapter(model, "lora", targets=["to_q", "to_k"], rank=2, init="gaussian")
    with torch.no_grad():  # a B ≠ 0, so both factors get gradients from the first step
        for p in difftune.trainable_parameters(model):
            p.normal_(0, 0.1)
    return model, adapter


def plan_for(model, start_step=0, samples_seen=0, world=2):
    optimizer = torch.optim.AdamW(difftune.trainable_parameters(model), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return loop.Optimization(model=model, optimizer=optimizer, lr_scheduler=scheduler, learning_rate=1e-2,
                             text_encoder_lr=1e-2, max_train_steps=3, batch_size=2, micro_batch=2 * world,
                             accumulation=2, max_grad_norm=0.05, global_step=start_step,
                             samples_seen=samples_seen)


def loss_of(model, indices):
    return model(DATA[list(indices)]).square().mean()


def test_the_shared_loop_equals_a_hand_written_one(tmp_path, monkeypatch):
    model, adapter = adapted()
    reference = copy.deepcopy(model)
    saved, stepped, seen = [], [], []
    monkeypatch.setattr(checkpointing, "save_checkpoint",
                        lambda output_dir, step, **kwargs: saved.append((step, kwargs["trainer_state"])))
    accelerator = Process(rank=1, world=2)
    plan = plan_for(model)

    def compute_loss(indices):
        seen.append(indices)
        loss = loss_of(plan.model, indices)
        return loss, {"twice": 2 * loss.detach()}

    loop.train(accelerator, plan, adapter, model, compute_loss,
               checkpoints=settings.CheckpointSettings(tmp_path, checkpointing_steps=2),
               trainer_state={"seed": 4}, base_model="tiny", after_step=stepped.append)

    # process 1 of 2, batch 2, 2 micro-steps: its slices of examples 0-7, 8-15, 16-23
    assert seen == [range(2, 4), range(6, 8), range(10, 12), range(14, 16), range(18, 20), range(22, 24)]
    assert accelerator.unsynced == 3  # gradients synchronised on the last micro-step only
    assert (plan.global_step, plan.samples_seen) == (3, 24)
    assert saved == [(2, {"seed": 4, "samples_seen": 16})]
    assert stepped == [1, 2, 3]

    # the same three steps by hand: mean of the micro-step losses, clipped, AdamW, schedule
    by_hand = plan_for(reference)
    parameters = difftune.trainable_parameters(reference)
    for step, first in enumerate((2, 10, 18)):
        losses = [loss_of(reference, range(start, start + 2)) for start in (first, first + 4)]
        for loss in losses:
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.05)
        by_hand.optimizer.step()
        by_hand.lr_scheduler.step()
        by_hand.optimizer.zero_grad()
        mean = sum(loss.item() / 2 for loss in losses)
        logged_step, logged = accelerator.logs[step]
        assert logged_step == step + 1
        assert logged["loss"] == pytest.approx(mean, rel=1e-6)
        assert logged["twice"] == pytest.approx(2 * mean, rel=1e-6)
        assert logged["lr"] == pytest.approx(1e-2 / (step + 2))
    for ours, theirs in zip(difftune.trainable_parameters(model), parameters, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-7)


def test_a_loop_started_from_a_checkpoint_position_continues_from_there(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "save_checkpoint", lambda *args, **kwargs: None)
    model, adapter = adapted()
    plan, seen = plan_for(model, start_step=2, samples_seen=16, world=1), []

    def compute_loss(indices):
        seen.append(indices)
        return loss_of(plan.model, indices), {}

    loop.train(Process(0, 1), plan, adapter, model, compute_loss,
               checkpoints=settings.CheckpointSettings(tmp_path, checkpointing_steps=1),
               trainer_state={}, base_model="tiny", save_checkpoints=False)
    assert seen == [range(16, 18), range(18, 20)] and plan.global_step == 3


def test_the_loop_adds_the_adapters_regularization(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "save_checkpoint", lambda *args, **kwargs: None)
    model, adapter = adapted()
    adapter.regularization_loss = lambda: torch.tensor(10.0)
    accelerator = Process(0, 1)
    plan = plan_for(model, world=1)
    loop.train(accelerator, plan, adapter, model, lambda indices: (loss_of(plan.model, indices), {}),
               checkpoints=settings.CheckpointSettings(tmp_path, checkpointing_steps=5), trainer_state={},
               base_model="tiny")
    assert all(logs["loss"] > 10.0 for _, logs in accelerator.logs)


def test_a_spec_builds_and_checks_its_config_once(monkeypatch):
    config_class = difftune.METHODS["lora"].config_class
    calls = []
    original = config_class.from_options.__func__

    def counting(cls, method, options):
        calls.append(dict(options))
        return original(cls, method, options)

    monkeypatch.setattr(config_class, "from_options", classmethod(counting))
    spec = difftune.AdapterSpec("lora", ["to_q"], {"rank": 2})
    with torch.device("meta"):
        assert list(spec.check(TinyNet())) == ["to_q"]
    model = TinyNet()
    adapter = spec.attach(model)
    assert calls == [{"rank": 2, "targets": ["to_q"]}]  # one config for the check and the attach
    assert adapter.config is spec.config and adapter.target_names == ["to_q"]
    assert difftune.count_trainable_parameters(model) == 2 * (8 + 8)
    assert spec.to_dict() == {"method": "lora", "adapter_options": {"rank": 2}, "targets": ["to_q"]}
    assert spec.with_targets("to_k").options == spec.options

    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method = "svfit"
    with pytest.raises(TypeError):
        spec.options["rank"] = 4
    with pytest.raises(DifftuneError, match="unknown option.*'lora': bogus"):
        difftune.AdapterSpec("lora", None, {"bogus": 1})


@pytest.mark.parametrize("script", ["train_subject.py", "train_one_step.py"])
def test_every_setting_is_a_flag_of_the_trainers(script):
    module = command_module(script.removesuffix(".py"))
    args = module.build_parser().parse_args(["--max_grad_norm", "0.5", "--checkpointing_steps", "7",
                                             "--mixed_precision", "no"])
    kinds = [settings.ModelSettings, settings.AcceleratorSettings, settings.MemorySettings,
             settings.OptimizerSettings, settings.CheckpointSettings]
    if script.endswith("train_subject.py"):
        kinds.append(settings.ValidationSettings)
    for kind in kinds:
        missing = [f.name for f in dataclasses.fields(kind) if not hasattr(args, f.name)]
        assert not missing, (kind.__name__, missing)
    assert arguments.settings_from_args(args, settings.OptimizerSettings).max_grad_norm == 0.5
    checkpoints = arguments.settings_from_args(args, settings.CheckpointSettings)
    assert checkpoints.checkpointing_steps == 7 and checkpoints.output_dir == settings.Path(args.output_dir)
    assert arguments.settings_from_args(args, settings.AcceleratorSettings).mixed_precision == "no"
