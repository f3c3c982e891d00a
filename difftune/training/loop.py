"""The steps every training script takes the same way: checks before loading, accelerator, seed,
adapter, optimizer and schedule, resume, the training loop and one optimizer step with the
adapter's hooks.

The scripts (train_subject.py, train_one_step.py) differ in their data and loss; what they
share lives here once, so a fix (an fp16 rule, a resume detail) reaches every trainer. The
functions take the adapter's `AdapterSpec` and the small settings of training/settings.py,
never the command line itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import gc
import math
import random
import signal
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import machine
from ..api import (
    AdapterSpec,
    adapted_experts,
    adapted_text_encoders,
    count_trainable_parameters,
    find_denoiser,
    get_adapter,
    has_adapter,
    load_adapter,
    read_adapter_info,
    trainable_parameters,
)
from ..errors import DifftuneError
from ..families import check_capability, denoiser_components, expert_components, get_family
from ..io import check_output_dir
from ..locking import lock_output_dir, release_all
from ..model_factory import build_denoiser_on_meta
from ..tuners import get_method
from . import checkpointing
from .settings import (
    QUANTIZATION_BACKENDS,
    AcceleratorSettings,
    CheckpointSettings,
    MemorySettings,
    ModelSettings,
    OptimizerSettings,
)

DEFAULT_LEARNING_RATE = 1e-4  # when neither --learning_rate nor the method gives one
# what training holds per trainable parameter at least: its fp32 value and gradient, and the
# optimizer's state (two fp32 AdamW moments; 8-bit AdamW: two bytes)
PARAMETER_BYTES = {"adamw": 4 + 4 + 8, "adamw-8bit": 4 + 4 + 2}


def check_before_loading(spec: AdapterSpec, model: ModelSettings, model_info: Any,
                         resolution: int | tuple[int, int] | None, output_dir: Path,
                         use_8bit_adam: bool = False) -> int | tuple[int, int]:
    """The adapter's targets on a weightless (meta-device) denoiser (its options were checked when
    the spec was made), the resolution (a side, or height and width; default: the model's own) and
    the adapter's size against the machine's memory, and the output folder; returns the resolution.
    Nothing heavy is loaded, so bad input fails in seconds."""
    check_output_dir(Path(output_dir))
    denoiser = build_denoiser_on_meta(model_info.denoiser_config, model_info.denoiser_class)
    spec.check(denoiser)
    resolution = resolution or model_info.resolution
    sides = (resolution,) if isinstance(resolution, int) else tuple(resolution)
    if any(side % model_info.size_multiple for side in sides):
        shown = "x".join(map(str, sides))
        raise DifftuneError(f"--resolution must be a multiple of {model_info.size_multiple} for "
                            f"{model.pretrained_model_name_or_path}, got {shown}")
    check_resolution_fits(resolution, model_info)
    check_adapter_fits(spec, denoiser, resolution, model_info, use_8bit_adam)
    return resolution


def _memory() -> tuple[str, int | None]:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return device_type, machine.memory_bytes(device_type)


def image_bytes(resolution: int | tuple[int, int], model_info: Any) -> int:
    """A lower bound of encoding one image (one frame of a clip: a side, or height and width): the fp32
    image and the VAE's first activation, twice."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    return height * width * (3 + 2 * model_info.vae_width) * 4


def check_adapter_fits(spec: AdapterSpec, meta_denoiser: nn.Module, resolution: int | tuple[int, int],
                       model_info: Any, use_8bit_adam: bool = False) -> None:
    """Refuse an adapter whose trainable parameters, with their gradients and optimizer state, cannot
    fit the machine's memory beside one image's encoding: a message now, not the system's OOM killer
    minutes into loading. ``meta_denoiser`` is weightless (`AdapterSpec.weightless_parameter_count`)."""
    device_type, available = _memory()
    if available is None:
        return
    trainable = spec.weightless_parameter_count(meta_denoiser)
    if trainable is None:  # only the weights decide (SaRA by threshold): the load itself will tell
        return
    optimizer = "adamw-8bit" if use_8bit_adam else "adamw"
    adapter = trainable * PARAMETER_BYTES[optimizer]
    image = image_bytes(resolution, model_info)
    if adapter + image > available:
        shown = resolution if isinstance(resolution, int) else "x".join(map(str, resolution))
        raise DifftuneError(
            f"the {spec.method} adapter (--adapter {spec.method} and its options) trains {trainable:,} "
            f"parameters: with their gradients and {'8-bit ' if use_8bit_adam else ''}AdamW state that is at "
            f"least {adapter / 2**30:.1f} GiB, plus {image / 2**30:.2f} GiB to encode one image at "
            f"--resolution {shown}; this machine's {device_type} memory is {available / 2**30:.1f} GiB: "
            "lower --rank, narrow --targets or use a smaller budget")


def check_resolution_fits(resolution: int | tuple[int, int], model_info: Any) -> None:
    """Refuse a resolution whose smallest possible footprint exceeds the machine's memory.

    Encoding one image through the VAE holds at least the fp32 image and its first block's
    activation (``vae_width`` channels) twice over (convolution output, then normalisation):
    a lower bound, so only resolutions that cannot run anywhere on this machine are refused,
    with a message instead of the system killing the run minutes later.
    """
    device_type, available = _memory()
    needed = image_bytes(resolution, model_info)
    if available is not None and needed > available:
        raise DifftuneError(
            f"--resolution {resolution} needs at least {needed / 2**30:.1f} GiB to encode one image, "
            f"this machine's {device_type} memory is {available / 2**30:.1f} GiB; use a smaller "
            f"--resolution (the model's own is {model_info.resolution})")


def create_accelerator(settings: AcceleratorSettings, output_dir: Path):
    """The run's Accelerator (mixed precision, tracker, logging folder); prepares ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        log_with=None if settings.report_to == "none" else settings.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / settings.logging_dir)),
        # an adapter may own parameters that a forward pass never reaches (a target the model
        # skips): DDP then waits for their gradients forever unless told to look for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if settings.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    hold_output_dir(accelerator, output_dir)  # before this run writes or cleans anything there
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_incomplete(output_dir)  # and temporary files of a killed save
    enable_stack_dumps()
    return accelerator


def hold_output_dir(accelerator: Any, output_dir: Path) -> None:
    """The main process locks ``output_dir`` for the run (`difftune.locking`); a folder another run
    holds is refused on every process at once, in one line naming it and that run."""
    refusal = None
    if accelerator.is_main_process:
        try:
            lock_output_dir(output_dir)
        except DifftuneError as err:
            refusal = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise DifftuneError(refusal)


def enable_stack_dumps() -> None:
    """``kill -USR1 <pid>`` makes a running trainer print every thread's Python stack to
    stderr and carry on: the way to see where a stuck (e.g. distributed) run waits."""
    stderr = sys.__stderr__  # the process's own stderr (sys.stderr may be a capture without a file)
    if not hasattr(signal, "SIGUSR1") or stderr is None:
        return
    with contextlib.suppress(OSError, ValueError):  # no file descriptor (e.g. some notebooks)
        faulthandler.register(signal.SIGUSR1, file=stderr, all_threads=True)


def end_training(accelerator: Any) -> None:
    """Destroy the process group once every DDP wrapper is gone; the caller drops its references first.

    A DDP model's reducer holds the process group. Were it the last holder, the group would
    be destroyed when the model is freed, with the GIL held, while a gloo worker thread still
    needs the GIL to free the tensors of the last collective: both wait for ever (2 of 20
    two-process CPU runs hung so at exit). Collected while the group is still registered, the
    model leaves the group to ``destroy_process_group``, whose destructor releases the GIL.
    """
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        from torch.nn.parallel import DistributedDataParallel

        gc.collect()  # a wrapper caught in a reference cycle goes now, not at exit
        if any(issubclass(type(obj), DistributedDataParallel) for obj in gc.get_objects()):
            warnings.warn("a DDP-wrapped model outlives training: destroying the process group "
                          "may hang at exit", RuntimeWarning, stacklevel=2)
    accelerator.end_training()
    release_all()  # the output folder's lock


def resolve_seed(seed: int | None, resume_state: dict | None) -> int:
    """``seed`` (--seed), else the resumed run's, else a random one; the same on every process."""
    from accelerate.utils import broadcast_object_list

    seed = seed if seed is not None else (resume_state or {}).get("seed", random.randrange(2**31))
    return broadcast_object_list([seed])[0]


BASE_ADAPTER_NAME = "base_{}"  # the names --base_adapter files are attached under, numbered from 1


def check_base_adapters(base_adapters: Sequence[tuple[str, float]]) -> None:
    """Each ``--base_adapter`` file is a readable difftune adapter file (one line naming it otherwise),
    before any model loads."""
    for path, _ in base_adapters:
        try:
            read_adapter_info(path)
        except DifftuneError as err:
            raise DifftuneError(f"--base_adapter {path}: {err}") from None


def describe_base_adapters(base_adapters: Sequence[tuple[str, float]]) -> str:
    """The trainers' banner part for ``--base_adapter``: the frozen files under the trained adapter."""
    if not base_adapters:
        return ""
    files = ", ".join(f"{Path(path).name} x{weight:g}" for path, weight in base_adapters)
    return f" | on top of frozen {files}"


def attach_base_adapters(model: Any, base_adapters: Sequence[tuple[str, float]]) -> None:
    """``--base_adapter``: each file attached in order as ``base_1``, ``base_2``, ... at its weight, and
    frozen (its text-encoder adapters too): the trained adapter goes on top of them."""
    for index, (path, weight) in enumerate(base_adapters, 1):
        name = BASE_ADAPTER_NAME.format(index)
        load_adapter(model, path, scale=weight, adapter_name=name)
        modules = [find_denoiser(model)[0], *adapted_text_encoders(model).values(),
                   *adapted_experts(model).values()]
        for module in modules:
            if has_adapter(module, name):
                get_adapter(module, name).freeze()


def load_base_pipeline(model: ModelSettings, dtype: torch.dtype, device: torch.device,
                       adapter_path: Path | None = None, offload: bool = False,
                       base_adapters: Sequence[tuple[str, float]] = ()):
    """The base pipeline in ``dtype`` on ``device`` with an fp32 VAE (fp16 VAEs give NaN latents
    and black images) and no progress bars. With ``adapter_path``: the saved adapter loaded (on top of
    the ``base_adapters`` it was trained on) and ``--prediction_type`` set on the scheduler, so samples
    come from the file users get. With ``offload`` only the denoisers go to ``device`` (``--offload``)."""
    from ..model_factory import load_pipeline

    pipeline = load_pipeline(model.pretrained_model_name_or_path, torch_dtype=dtype,
                             revision=model.revision, variant=model.variant,
                             **quantization_kwargs(model, dtype))
    pipeline.vae.to(torch.float32)
    if adapter_path is not None:
        if model.prediction_type:
            pipeline.scheduler.register_to_config(prediction_type=model.prediction_type)
        attach_base_adapters(pipeline, base_adapters)
        load_adapter(pipeline, adapter_path)
    if offload:  # the denoisers alone (both experts of a two-expert model); the rest stays on the CPU
        for name in (*denoiser_components(), *expert_components()):
            if isinstance(getattr(pipeline, name, None), nn.Module):
                getattr(pipeline, name).to(device)
    else:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_training_model(model: ModelSettings, loss_options: Any, dtype: torch.dtype, device: torch.device,
                        offload: bool = False):
    """The base pipeline and its family bound for training (noise process, loss options), the VAE
    and text encoders frozen (left on the CPU with ``offload``); returns (pipeline, family)."""
    from ..families import training_family

    pipeline = load_base_pipeline(model, dtype, device, offload=offload)
    family = training_family(pipeline, device, loss_options)
    for frozen in (pipeline.vae, *family.text_encoders):
        frozen.requires_grad_(False)
    return pipeline, family


def is_fsdp(accelerator: Any) -> bool:
    """Whether accelerate shards the model (FSDP); CPU launches always run as DDP instead."""
    return str(getattr(accelerator, "distributed_type", "")).endswith("FSDP")


def check_fsdp(accelerator: Any, method: str, resume_from_checkpoint: str | None,
               family: str | None = None) -> bool:
    """Under FSDP: refuse what it cannot do (a method or model family that cannot be sharded,
    resuming) and say what changes; returns whether FSDP is on.

    A method that writes its trained values into the base weights (SaRA, `Adapter.fsdp_refusal`)
    has no whole tensor to write into when they are sharded, so it runs under DDP (or one
    process), not FSDP. Checkpoints of a sharded run would need per-process shards of the adapter
    and optimizer state, which difftune's checkpoints do not hold yet: none are written and none
    are resumed; the adapter is gathered and saved once at the end.
    """
    if not is_fsdp(accelerator):
        return False
    refusal = get_method(method).fsdp_refusal
    if refusal:
        raise DifftuneError(f"--adapter {method} cannot run under FSDP: {refusal}; launch it with DDP "
                            "(accelerate launch --multi_gpu) or on one GPU with --mixed_precision bf16")
    if family is not None:
        check_capability(get_family(family), "fsdp", "FSDP")
    if resume_from_checkpoint:
        raise DifftuneError("--resume_from_checkpoint is not supported under FSDP (its checkpoints are "
                            "not written); resume under DDP or on one GPU")
    if accelerator.is_main_process:
        warnings.warn("FSDP: no intermediate checkpoints are written (--checkpointing_steps is "
                      "ignored); the adapter is gathered from the shards and saved at the end",
                      stacklevel=2)
    return True


def gather_sharded_parameters(model: nn.Module, module_names: Sequence[str]) -> None:
    """Replace every FSDP2-sharded parameter (a DTensor) of the named modules and their children by
    its whole tensor, so the adapter's state dict and fingerprint read plain tensors.

    A collective: every process must call it, with the same names. Only the adapted layers are
    gathered (their adapter tensors and base weights), not the whole model; run it after the
    last optimizer step, since the modules are no longer sharded afterwards.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return
    for name in module_names:
        for module in model.get_submodule(name).modules():
            for key, param in list(module._parameters.items()):
                if isinstance(param, DTensor):
                    module._parameters[key] = nn.Parameter(param.full_tensor().detach(),
                                                           requires_grad=param.requires_grad)


def quantization_kwargs(model: ModelSettings, dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the denoiser (``--quantize_base``) and the frozen text
    encoders (``--quantize_text_encoder``) through bitsandbytes (checked by
    arguments.check_quantized_base before anything loads); empty without either flag."""
    bits = model.quantize_base or model.quantize_text_encoder
    if bits is None:
        return {}
    from diffusers import PipelineQuantizationConfig

    from ..model_factory import describe_model

    described = describe_model(model.pretrained_model_name_or_path, model.revision)
    family = get_family(described.family)
    components: list[str] = []
    if model.quantize_base:  # the denoiser, or every expert of a model with several (Wan 2.2's two)
        components += list(described.experts) or [family.denoiser_component]
    if model.quantize_text_encoder:
        components += list(family.text_encoder_components)
    quant_kwargs: dict[str, Any] = {"load_in_8bit": True} if bits == "8bit" else {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    config = PipelineQuantizationConfig(quant_backend=QUANTIZATION_BACKENDS[bits], quant_kwargs=quant_kwargs,
                                        components_to_quantize=components)
    return {"quantization_config": config}


def attach_trainable_adapter(denoiser: nn.Module, spec: AdapterSpec, seed: int, memory: MemorySettings,
                             init_adapter: str | None = None, pipeline: Any = None,
                             base_adapters: Sequence[tuple[str, float]] = ()):
    """The adapter of ``spec``, seeded; trainable parameters in fp32 under fp16/bf16; memory options
    applied. With ``init_adapter`` (and the pipeline) it starts from that file instead: a difftune
    file, or another tool's LoRA file, imported. ``base_adapters`` (``--base_adapter``) are attached
    first, frozen (`attach_base_adapters`)."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    attach_base_adapters(pipeline if pipeline is not None else denoiser, base_adapters)
    set_seed(seed)  # the adapter's initialisation
    if init_adapter:
        adapter = load_adapter(pipeline if pipeline is not None else denoiser, init_adapter)
    else:
        adapter = spec.attach(denoiser)
    cast_training_params(denoiser, torch.float32)
    if memory.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if memory.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()
    if memory.compile:
        compile_denoiser(denoiser, memory.compile_backend)
    return adapter


def compile_denoiser(denoiser: nn.Module, backend: str = "inductor") -> str:
    """torch.compile the denoiser in place (its attributes, state dict and adapter stay as they are):
    only its repeated blocks where the model class lists them (diffusers' regional compilation,
    ``compile_repeated_blocks``), else the whole forward. Layers whose trained entries difftune
    writes (SaRA) run eagerly inside the compiled code, one graph break each. Returns "regional" or
    "whole" (``--compile_backend`` is checked with the other flags)."""
    if getattr(denoiser, "_repeated_blocks", None) and hasattr(denoiser, "compile_repeated_blocks"):
        denoiser.compile_repeated_blocks(backend=backend)
        return "regional"
    denoiser.compile(backend=backend)
    return "whole"


def learning_rate(settings: OptimizerSettings, adapter: Any, examples_per_step: int) -> float:
    """``--learning_rate``, else the method's own rule, else 1e-4; times the batch with --scale_lr."""
    rate = settings.learning_rate or adapter.default_learning_rate() or DEFAULT_LEARNING_RATE
    return rate * examples_per_step if settings.scale_lr else rate


def create_optimizer(settings: OptimizerSettings, adapter: Any, rate: float, max_train_steps: int,
                     extra: Sequence[tuple[Any, float]] = ()):
    """AdamW (or 8-bit AdamW) over the adapter's parameter groups, and the learning-rate schedule.

    ``extra`` adds (adapter, learning rate) pairs, e.g. text-encoder adapters with their own rate;
    the schedule scales every group's rate alike."""
    from diffusers.optimization import get_scheduler

    if settings.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    groups = adapter.optimizer_parameter_groups(settings.adam_weight_decay)
    for extra_adapter, extra_rate in extra:
        groups += [{**group, "lr": extra_rate}
                   for group in extra_adapter.optimizer_parameter_groups(settings.adam_weight_decay)]
    optimizer = optimizer_class(groups, lr=rate,
                                betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_epsilon,
                                weight_decay=settings.adam_weight_decay)
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=settings.lr_num_cycles,
                                 power=settings.lr_power)
    return optimizer, lr_scheduler


def resume_optimizer_and_rng(resume_path: Path, optimizer: Any, lr_scheduler: Any, accelerator: Any) -> None:
    """Optimizer and schedule state, and this process's random generators, from a checkpoint."""
    checkpointing.load_optimizer_state(resume_path, optimizer, lr_scheduler)
    restored = checkpointing.load_rng_state(resume_path, accelerator.process_index)
    if not restored and accelerator.is_main_process:
        print(f"warning: {resume_path} has no random state for process {accelerator.process_index}; "
              "the run continues but is not bit-identical to an uninterrupted one")


@dataclasses.dataclass
class Optimization:
    """What the training loop steps: the prepared model, optimizer and schedule, and where it is
    (`train` advances ``global_step`` and ``samples_seen``)."""

    model: nn.Module
    optimizer: Any
    lr_scheduler: Any
    learning_rate: float
    text_encoder_lr: float  # the rate of adapted text encoders (the denoiser's unless set)
    max_train_steps: int
    batch_size: int  # examples per micro-step of one process
    micro_batch: int  # examples per micro-step over all processes
    accumulation: int
    max_grad_norm: float
    global_step: int
    samples_seen: int


def prepare_optimization(settings: OptimizerSettings, checkpoints: CheckpointSettings, accelerator: Any,
                         denoiser: nn.Module, adapter: Any, dataset_size: int, resume_path: Path | None,
                         resume_state: dict | None, device: torch.device,
                         text_encoders: Mapping[str, nn.Module] | None = None,
                         text_encoder_lr: float | None = None,
                         extra_groups: Sequence[tuple[Any, float]] = ()) -> Optimization:
    """Steps and learning rate from the batch geometry, adapter state, optimizer and schedule (all
    restored when resuming), and the model prepared by accelerate. The schedule is stepped once
    per optimizer step by `optimizer_step`, so it is not prepared. Adapted ``text_encoders`` train
    at ``text_encoder_lr`` (default: the denoiser's rate); ``extra_groups`` adds (owner of
    ``optimizer_parameter_groups``, rate) pairs, e.g. new token embeddings (training/pivotal.py)."""
    micro_batch = settings.train_batch_size * accelerator.num_processes
    accumulation = settings.gradient_accumulation_steps
    steps_per_epoch = -(-dataset_size // (micro_batch * accumulation))
    max_train_steps = settings.max_train_steps or settings.num_train_epochs * steps_per_epoch
    rate = learning_rate(settings, adapter, micro_batch * accumulation)
    text_encoders = dict(text_encoders or {})
    text_rate = text_encoder_lr or rate
    global_step, samples_seen = 0, 0
    if resume_path:
        checkpointing.load_adapter_state(resume_path, denoiser, device, text_encoders)
        global_step, samples_seen = resume_state["step"], resume_state["samples_seen"]
    if accelerator.is_main_process:
        trainable = sum(count_trainable_parameters(m) for m in (denoiser, *text_encoders.values()))
        needed = checkpointing.estimated_bytes(trainable, max_train_steps, checkpoints.checkpointing_steps,
                                               checkpoints.checkpoints_total_limit)
        checkpointing.warn_if_disk_short(checkpoints.output_dir, needed)
    extra = [(get_adapter(encoder), text_rate) for encoder in text_encoders.values()] + list(extra_groups)
    optimizer, lr_scheduler = create_optimizer(settings, adapter, rate, max_train_steps, extra)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    if resume_path:
        resume_optimizer_and_rng(resume_path, optimizer, lr_scheduler, accelerator)
    return Optimization(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, learning_rate=rate,
                        text_encoder_lr=text_rate, max_train_steps=max_train_steps,
                        batch_size=settings.train_batch_size, micro_batch=micro_batch,
                        accumulation=accumulation, max_grad_norm=settings.max_grad_norm,
                        global_step=global_step, samples_seen=samples_seen)


class NonFiniteTrainingError(DifftuneError):
    """Training diverged: a loss, gradient or adapter parameter became NaN or infinite."""


NON_FINITE_ADVICE = ("Lower --learning_rate (and keep --max_grad_norm clipping on), or train in higher "
                     "precision (--mixed_precision no instead of fp16/bf16)")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One device sync for all tensors, not one per tensor."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_finite(accelerator: Any, step: int, what: str, finite: bool) -> None:
    """Stop the run on every process at once when ``finite`` is False on any of them.

    Each process decides from its own loss; the verdict is shared (one small all-reduce) so no
    process is left waiting in a collective while another one stops.
    """
    if accelerator.num_processes > 1:
        flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
        finite = accelerator.reduce(flag, reduction="sum").item() == 0
    if not finite:
        raise NonFiniteTrainingError(
            f"training stopped at step {step + 1}: {what} is not finite (NaN or inf); nothing of this "
            f"step was saved. {NON_FINITE_ADVICE}")


def optimizer_step(accelerator: Any, adapter: Any, denoiser: nn.Module, optimizer: Any, lr_scheduler: Any,
                   step: int, max_train_steps: int, max_grad_norm: float, loss: float,
                   text_encoders: Mapping[str, nn.Module] | None = None) -> float:
    """One optimizer step after the accumulated backward passes, with the adapters' hooks around it
    (a method may change the update or its parameters there); returns the learning rate used.
    Adapted ``text_encoders`` get the same hooks, and their parameters share the gradient clip.

    ``loss`` is the step's mean loss. A non-finite loss, gradient norm or updated parameter stops
    training here (`NonFiniteTrainingError`), before a checkpoint or the adapter can be written:
    a diverged run must not end with exit status 0 and a file of NaNs. Under fp16 with a gradient
    scaler, overflowing gradients are the scaler's business (it skips the step), so only the loss
    and the parameters are checked then.
    """
    check_finite(accelerator, step, f"the loss ({loss})", math.isfinite(loss))
    adapters = [adapter, *(get_adapter(m) for m in (text_encoders or {}).values())]
    parameters = [p for module in (denoiser, *(text_encoders or {}).values())
                  for p in trainable_parameters(module)]
    for each in adapters:
        each.before_optimizer_step(step, max_train_steps)
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if accelerator.scaler is None and norm is not None:
        norm = float(norm)
        check_finite(accelerator, step, f"the gradient norm ({norm})", math.isfinite(norm))
    optimizer.step()
    stepped = not accelerator.optimizer_step_was_skipped
    for each in adapters:
        each.finish_optimizer_step(step + 1, max_train_steps, optimizer, stepped)
    check_finite(accelerator, step, "an adapter parameter after the update",
                 _all_finite([p.detach() for p in parameters]))
    if stepped:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr_scheduler.get_last_lr()[0]


def diffusion_loss(family: Any, model: nn.Module, batch: Any) -> torch.Tensor:
    """The denoising loss of each example of a `TrainingBatch`: its latents drawn from the cached
    posterior, noised by the family's process, predicted by ``model`` (the prepared denoiser)."""
    latents = family.latents_from_moments(batch.moments, batch.generators)
    noise = family.sample_noise(latents, batch.generators)
    noisy = family.add_noise(latents, noise, batch.generators)
    prediction = family.predict(model, noisy, batch)
    return family.per_example_loss(prediction, noisy)


# A trainer's loss on this process's examples ``indices`` of the current micro-step: the loss to
# back-propagate (the adapters' regularization is added by `train`) and further terms to log.
LossFunction = Callable[[range], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


def train(accelerator: Any, plan: Optimization, adapter: Any, denoiser: nn.Module, compute_loss: LossFunction,
          *, checkpoints: CheckpointSettings, trainer_state: Mapping[str, Any], base_model: str,
          text_encoders: Mapping[str, nn.Module] | None = None, save_checkpoints: bool = True,
          after_step: Callable[[int], None] | None = None, ema: Any = None) -> None:
    """The training loop both trainers run, from ``plan.global_step`` to ``plan.max_train_steps``.

    Each optimizer step accumulates ``plan.accumulation`` micro-steps (gradients synchronised
    across processes on the last only), then runs `optimizer_step`, logs the mean loss, its
    terms and the learning rate, writes a checkpoint every ``checkpointing_steps`` (with
    ``trainer_state`` and the samples seen; none when ``save_checkpoints`` is False, e.g. under
    FSDP) and calls ``after_step(step)`` (validation). An ``ema`` (training/ema.py) is stepped after
    every optimizer step and saved in the checkpoints. Micro-step k of a step reads the examples
    ``samples_seen + k * micro_batch + process_index * batch_size`` onwards, so what a step
    draws depends only on where the run is: a resumed run continues bit-identically.
    """
    model = plan.model
    adapters = [adapter, *(get_adapter(m) for m in (text_encoders or {}).values())]
    progress = tqdm(total=plan.max_train_steps, initial=plan.global_step, desc="training",
                    disable=not accelerator.is_main_process)
    while plan.global_step < plan.max_train_steps:
        logs: dict[str, float] = {}
        for micro_step in range(plan.accumulation):
            # This process's slice of the global micro-batch (see difftune.training.data).
            first = (plan.samples_seen + micro_step * plan.micro_batch
                     + accelerator.process_index * plan.batch_size)
            sync = micro_step == plan.accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss, terms = compute_loss(range(first, first + plan.batch_size))
                for each in adapters:
                    regularization = each.regularization_loss()
                    if regularization is not None:
                        loss = loss + regularization
                accelerator.backward(loss / plan.accumulation)
            for name, value in {"loss": loss.detach(), **terms}.items():
                logs[name] = logs.get(name, 0.0) + value.item() / plan.accumulation
        logs["lr"] = optimizer_step(accelerator, adapter, denoiser, plan.optimizer, plan.lr_scheduler,
                                    plan.global_step, plan.max_train_steps, plan.max_grad_norm, logs["loss"],
                                    text_encoders)
        if ema is not None:
            ema.step()
        plan.global_step += 1
        plan.samples_seen += plan.micro_batch * plan.accumulation
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=plan.global_step)
        if save_checkpoints and plan.global_step % checkpoints.checkpointing_steps == 0:
            checkpointing.save_checkpoint(
                checkpoints.output_dir, plan.global_step, model=model, optimizer=plan.optimizer,
                lr_scheduler=plan.lr_scheduler,
                trainer_state={**trainer_state, "samples_seen": plan.samples_seen}, accelerator=accelerator,
                total_limit=checkpoints.checkpoints_total_limit, base_model=base_model,
                text_encoders=dict(text_encoders or {}),
                extra_states={"ema": ema} if ema is not None else None)
        if after_step is not None:
            after_step(plan.global_step)
    progress.close()
