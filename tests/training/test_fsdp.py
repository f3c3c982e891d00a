"""FSDP2 (torch's fully_shard) on two CPU processes over gloo: LoRA, SVFit and TLoRA on the tiny
Flux transformer with its blocks sharded, bf16 base weights and fp32 adapter tensors, train to
the same adapter as one process with the same global batch; the trainer's gather step gives the
saved file. SaRA is refused under FSDP; the accelerate config of the docs is checked.

accelerate runs a CPU launch as DDP whatever its FSDP settings say, so the trainer itself runs
under FSDP only on GPUs (docs/flux.md has the config and command); what FSDP changes inside it
(the sharded model, gathering the adapter before saving) is what these tests run.
"""

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import difftune
from difftune.errors import DifftuneError
from difftune.training import loop

METHODS = {"lora": {"rank": 4, "init": "gaussian"}, "svfit": {}, "tlora": {}}
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_model(method: str):
    """The tiny Flux transformer in bf16 with an fp32 adapter whose every tensor is non-zero."""
    from conftest import randomize_adapter

    from difftune.families.flux import FluxFamily

    torch.manual_seed(0)
    transformer = FluxFamily.tiny_denoiser().to(torch.bfloat16)
    difftune.add_adapter(transformer, method, targets="attn", **METHODS[method])
    for param in difftune.trainable_parameters(transformer):
        param.data = param.data.float()
    randomize_adapter(transformer, std=0.02)
    return transformer


def batch(indices):
    """Fixed packed inputs for examples ``indices`` (one per process, or all in one)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 16, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    pooled = torch.randn(2, 32, generator=gen)
    target = torch.randn(2, 64, 16, generator=gen)
    ids = torch.zeros(64, 3)
    ids[:, 1], ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    return ({"hidden_states": x[indices].bfloat16(), "encoder_hidden_states": text[indices].bfloat16(),
             "pooled_projections": pooled[indices].bfloat16(), "timestep": torch.full((len(indices),), 0.5),
             "img_ids": ids, "txt_ids": torch.zeros(5, 3), "guidance": torch.full((len(indices),), 3.5),
             "return_dict": False}, target[indices])


def train(model, indices):
    # SGD: the update is linear in the gradient, so the two runs differ only by float sums
    optimizer = torch.optim.SGD(difftune.trainable_parameters(model), lr=1.0)
    for _ in range(STEPS):
        kwargs, target = batch(indices)
        loss = (model(**kwargs)[0].float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        for method in METHODS:
            model = setup_model(method)
            for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
                fully_shard(block)
            fully_shard(model)
            params = difftune.trainable_parameters(model)
            assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in params)
            train(model, [rank])  # each process its own example; FSDP averages the gradients
            loop.gather_sharded_parameters(model, difftune.get_adapter(model).target_names)
            if rank == 0:
                difftune.save_adapter(model, Path(out) / method)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_fsdp_trains_the_same_adapter_as_one_process(tmp_path):
    # fork: the workers start with torch and diffusers already imported (spawn re-imports them);
    # a worker that hangs fails the test after two minutes instead of stalling the suite
    workers = mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + 120
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two FSDP processes did not finish in 120 s")
    for method in METHODS:
        single = setup_model(method)
        train(single, [0, 1])
        from safetensors.torch import load_file

        path = tmp_path / method / "adapter.safetensors"
        theirs = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
        fresh = setup_model(method)  # the file loads into an unsharded model of the same base
        difftune.remove_adapter(fresh)
        difftune.load_adapter(fresh, path)
        ours = difftune.get_adapter(single).adapter_state_dict()
        start = difftune.get_adapter(setup_model(method)).adapter_state_dict()
        assert theirs.keys() == ours.keys()
        trained = 0
        for key, value in ours.items():
            # same examples, only the order of float sums differs (bf16 base weights); tensors
            # that do not train (SVFit's reference σ) must come out unchanged
            moved = (value.float() - start[key].float()).abs().max()
            trained += int(moved > 0)
            assert (theirs[key].float() - value.float()).abs().max() <= 0.05 * moved + 1e-7, (method, key)
        assert trained > 0, method


class FakeAccelerator:
    is_main_process = True

    def __init__(self, kind: str):
        self.distributed_type = kind


def test_fsdp_refuses_sara_and_resume_and_warns_about_checkpoints():
    fsdp, ddp = FakeAccelerator("DistributedType.FSDP"), FakeAccelerator("DistributedType.MULTI_GPU")
    with pytest.raises(DifftuneError, match="sara cannot run under FSDP.*DDP"):
        loop.check_fsdp(fsdp, "sara", None)
    with pytest.raises(DifftuneError, match="--resume_from_checkpoint is not supported under FSDP"):
        loop.check_fsdp(fsdp, "lora", "latest")
    for method in ("lora", "svfit", "tlora"):
        with pytest.warns(UserWarning, match="no intermediate checkpoints"):
            assert loop.check_fsdp(fsdp, method, None)
    assert not loop.check_fsdp(ddp, "sara", "latest")


def test_the_documented_accelerate_config_is_an_fsdp2_config_accelerate_reads():
    """docs/accelerate_fsdp_flux.yaml: FSDP2, full shard, Flux's two block classes wrapped."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).resolve().parents[2] / "docs" / "accelerate_fsdp_flux.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert str(config.distributed_type).endswith("FSDP")
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == {
        "FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "bf16"
