"""What differs between model families, behind one class per family.

A family class answers every question the rest of difftune has about a kind of model, the way
kohya sd-scripts' ``sdxl_train_network.py`` owns what SDXL does differently:

* which pipelines it is (``pipeline_classes``; the family's other pipelines, inpainting or
  image-to-image ones, are refused by name), its denoiser and text encoders;
* its tiny built-in (``builtin:tiny-<name>``: `tiny_denoiser_config` and `build_tiny`);
* its geometry: native resolution, the latent patch one token covers, the latent layout the
  denoiser takes (Flux packs 2x2 patches into tokens);
* its noise process and prediction target (`DDPMFamily`, `FlowMatchingFamily`), the trainer flags
  that apply and their defaults;
* how prompts condition it (`encode_prompts`, `model_kwargs`);
* the adapter targets it adds to the presets, what it can do (`text_encoder_targets`, ``fsdp``,
  ``single_file_layout``, ...) and how other tools name its weights (`LoraKeyLayout`);
* the one-step (HiPA) hooks: packing of the latents a pipeline takes, embedded guidance;
* video (``video``): clips as latents (B, C, frames, h, w), and several denoisers that each take a range
  of noise levels (``expert_components``, Wan 2.2).

Class attributes and class methods describe the family without a model; an instance binds it
to a loaded pipeline for training (``family(pipeline, device, options)``). A flow-matching DiT
family is mostly declarative: its pipeline class, denoiser, tiny config, prompt outputs and the
denoiser arguments they feed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DifftuneError
from ..options import CheckedSettings, in_range, non_negative, option, positive
from .tiny import TINY_SAMPLE_SIZE, TINY_VAE_WIDTH, build_model

# Words in a pipeline class name that mark a task other than text to image (refused by name).
OTHER_TASKS = {
    "Inpaint": "inpainting", "Img2Img": "image to image", "Fill": "inpainting and outpainting",
    "Kontext": "image editing", "Control": "control images", "Depth2Img": "depth to image",
    "Upscale": "upscaling", "InstructPix2Pix": "instruction editing", "Redux": "image variations",
    "Prior": "image priors", "Adapter": "image adapters", "PAG": "perturbed-attention guidance",
    "Edit": "image editing", "Layered": "layer decomposition", "Omni": "editing with reference images",
    "ImageToVideo": "image to video", "VideoToVideo": "video to video", "VACE": "video editing",
    "Animate": "character animation",
}


# --weighting_scheme values (diffusers.training_utils.compute_density_for_timestep_sampling and
# compute_loss_weighting_for_sd3)
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")
# --expert values: the high-noise expert, the low-noise one, or both (each on its range)
EXPERT_CHOICES = ("high", "low", "both")


@dataclasses.dataclass
class LossOptions(CheckedSettings):
    """Noise, loss-weighting and conditioning options, and the one definition of their trainer flags
    (same names). A family reads those it applies (`ModelFamily.applicable_flags`), and ``--help``
    names the families each flag applies to and their defaults; None: the family's default
    (`ModelFamily.option_defaults`)."""

    flag_group: ClassVar[str] = "noise and loss"

    noise_offset: float = option(0.0, "offset noise: add this times a per-channel constant to the noise",
                                 check=non_negative())
    snr_gamma: float | None = option(None, "Min-SNR loss weighting with this gamma (5.0 is the paper's "
                                           "value)", check=positive())
    prediction_type: str | None = None  # the --prediction_type flag of the model's settings
    weighting_scheme: str | None = option(None, "timestep density and loss weighting, as diffusers' "
                                                "DreamBooth scripts", choices=WEIGHTING_SCHEMES)
    logit_mean: float | None = option(None, "mean of the logit_normal density")
    logit_std: float | None = option(None, "standard deviation of the logit_normal density")
    mode_scale: float | None = option(None, "scale of the mode density")
    precondition_outputs: bool = option(False, "precondition the prediction to x0 as in SD3's full "
                                               "fine-tuning script")
    # a guidance embedding's value (Flux)
    guidance_scale: float | None = option(None, "value of the guidance embedding during training; ignored "
                                                "by models without one, e.g. FLUX.1-schnell")
    # prompt tokens (the T5 of Flux and Wan, the language model of FLUX.2, Qwen-Image and Z-Image)
    max_sequence_length: int | None = option(None, "prompt tokens (T5's on Flux and Wan, the language "
                                                   "model's on the others), at most 512",
                                             check=in_range(1, 512, why="FLUX.1's T5 limit"))
    # shift of the flow-matching timestep table (Wan; default: its sampler's)
    flow_shift: float | None = option(None, "shift s of the timestep table training draws from, "
                                            "σ' = s·σ / (1 + (s-1)·σ) (default: the shift of the model's own "
                                            "sampler)", check=positive())
    # which of several denoisers trains (Wan 2.2)
    expert: str | None = option(None, "which denoiser of a two-expert model trains, on its own noise range "
                                      "(Wan 2.2: high = transformer, t >= boundary; low = transformer_2; "
                                      "both: each on its range, one file; default: both on such models)",
                                choices=EXPERT_CHOICES)


@dataclasses.dataclass
class TrainingBatch:
    """What a training step needs; tensors are on the training device."""

    moments: torch.Tensor  # VAE posterior (mean, logvar) concatenated on channels
    conditioning: dict[str, torch.Tensor]  # prompt embeddings, keyed as the pipeline names them
    original_sizes: torch.Tensor  # (B, 2) height, width before resizing
    crops_top_left: torch.Tensor  # (B, 2)
    is_prior: torch.Tensor  # (B,) bool: class images of prior preservation
    generators: list[torch.Generator]  # one per example, for the rest of the step's randomness


@dataclasses.dataclass
class NoisyInput:
    """A noised batch: what the denoiser sees and what its output is compared with."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor  # (B,) per-example loss weight
    sigmas: torch.Tensor | None = None  # flow matching only, broadcastable to the latents


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What a trainer must know about a base model before loading its weights."""

    family: str
    resolution: int  # the native training resolution in pixels
    denoiser_class: str  # diffusers class of the unet / transformer
    denoiser_config: dict[str, Any]
    size_multiple: int  # image sides must be multiples of this (VAE factor x latent patch)
    vae_width: int  # channels of the VAE encoder's first block: its activations bound memory from below
    experts: tuple[str, ...] = ()  # its denoisers for noise ranges, when it has several (Wan 2.2)
    frame_multiple: int = 1  # clips have 1 + k·this frames (the VAE's temporal compression; video only)


def text_encoder_path(component: str, module: str, denoiser_config: Any = None) -> str:
    """A module path as the original checkpoints spell it: CLIP text-encoder modules under
    ``text_model.`` (transformers 5.6 dropped that level from CLIPTextModel, not from
    CLIPTextModelWithProjection; the tools and files kept it), anything else unchanged."""
    if not component.startswith("text_encoder") or module.startswith(("text_model.", "text_projection")):
        return module
    return f"text_model.{module}"


@dataclasses.dataclass(frozen=True)
class LoraKeyLayout:
    """How another tool names the LoRA tensors of one module: ``<key>.<down>``, ``<key>.<up>`` and
    ``<key>.alpha``, where the key is the component's prefix and the module's path, joined by
    ``separator`` (``_``: kohya's rule, every dot of the path also becomes an underscore)."""

    prefixes: Mapping[str, str]  # component (unet, transformer, text_encoder, ...) -> prefix
    separator: str = "_"
    down: str = "lora_down.weight"
    up: str = "lora_up.weight"
    module_path: Callable[[str, str, Any], str] = text_encoder_path  # (component, module, denoiser config)
    diffusers_reads: bool = True  # False: difftune renames such a file before diffusers loads it
    tool: str = "this layout"  # whose names they are, for messages
    # False: no ``.alpha`` tensors (a reader that refuses them); the strength alpha/rank is folded into up
    writes_alpha: bool = True
    # the module paths the tool maps (a regex, fullmatched); None: every module has a name
    known_modules: str | None = None

    def key(self, component: str, module: str, denoiser_config: Any = None) -> str:
        if component not in self.prefixes:
            raise DifftuneError(f"no LoRA names for the {component} in this layout "
                                f"(it names {', '.join(self.prefixes)})")
        if self.known_modules is not None and not re.fullmatch(self.known_modules, module):
            raise DifftuneError(f"{self.tool} has no name for the {component} module '{module}', so a file "
                                f"that changes it cannot be written in its layout; adapt fewer layers "
                                f"(--targets attn or attn-ff) or export with --format diffusers")
        path = self.module_path(component, module, denoiser_config)
        if self.separator == "_":
            path = path.replace(".", "_")
        return f"{self.prefixes[component]}{self.separator}{path}"


def randn_per_example(shape: Sequence[int], generators: Sequence[torch.Generator],
                      device: torch.device) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked (drawn on CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


class ModelFamily(ABC):
    """One model family (see the module docstring); subclasses set the class attributes below."""

    # --- identity and detection --------------------------------------------------------
    name: ClassVar[str]  # short name: files, messages, builtin:tiny-<name>
    title: ClassVar[str]  # how messages name it ("SD 1.x/2.x")
    pipeline_classes: ClassVar[tuple[str, ...]]  # diffusers text-to-image pipelines of the family
    # class-name prefix of its other pipelines, refused by name (None: the first class's, less "Pipeline")
    pipeline_prefix: ClassVar[str | None] = None

    # --- the model ----------------------------------------------------------------------
    denoiser_component: ClassVar[str] = "transformer"  # its pipeline attribute ("unet" on UNets)
    denoiser_class: ClassVar[str]  # the diffusers class of the denoiser
    text_encoder_components: ClassVar[tuple[str, ...]] = ()
    tiny_denoiser_config: ClassVar[dict[str, Any] | None] = None  # None: no tiny built-in
    tiny_vae_widths: ClassVar[tuple[int, ...]] = (TINY_VAE_WIDTH, 64)  # of the tiny VAE's blocks
    # full-size denoiser configs by name, for parameter counts on the meta device (difftune.params)
    reference_configs: ClassVar[dict[str, dict[str, Any]]] = {}
    # further tiny built-ins, ``builtin:tiny-<key>``: `build_tiny` options (another layout of the family)
    tiny_variants: ClassVar[dict[str, dict[str, Any]]] = {}

    # --- video and experts --------------------------------------------------------------
    # the denoiser takes clips, latents (B, C, frames, h, w); its pipeline samples ``num_frames`` and
    # returns ``frames`` (difftune.video reads and writes the clips)
    video: ClassVar[bool] = False
    # pipeline components that each denoise a range of noise levels, highest noise first (Wan 2.2's
    # transformer and transformer_2); a model has them all or only the first
    expert_components: ClassVar[tuple[str, ...]] = ()

    # --- geometry -----------------------------------------------------------------------
    default_sample_size: ClassVar[int | None] = None  # latent size when the config has none
    latent_packing: ClassVar[int] = 1  # side of the latent patch the pipeline packs into one token
    # training latents: a sample of the VAE posterior (False: its mode, as FLUX.2's and Z-Image's scripts)
    sample_posterior: ClassVar[bool] = True
    # image sides the family's diffusers pipeline accepts beyond the latent patch (its check_inputs)
    pipeline_side_multiple: ClassVar[int] = 1

    # --- trainer flags: those of the noise process (`process_flags`) and the family's own ---
    process_title: ClassVar[str]
    process_flags: ClassVar[tuple[str, ...]] = ()
    family_flags: ClassVar[tuple[str, ...]] = ()
    option_defaults: ClassVar[dict[str, Any]] = {}  # LossOptions defaults of this family

    # --- conditioning -------------------------------------------------------------------
    prompt_outputs: ClassVar[tuple[str | None, ...]]  # names of encode_prompt's outputs (None: unused)
    sample_argument: ClassVar[str] = "hidden_states"  # the denoiser's latent argument
    conditioning_arguments: ClassVar[dict[str, str]] = {"encoder_hidden_states": "prompt_embeds"}
    embedded_guidance: ClassVar[bool] = False  # guidance_scale is an embedding's value (no CFG)
    # the pipeline argument of classifier-free guidance, and its value that means none (one call a step)
    guidance_argument: ClassVar[str] = "guidance_scale"
    unguided_scale: ClassVar[float] = 1.0

    # --- targets and capabilities -------------------------------------------------------
    # what the family adds to the target presets: {preset: ((regex alternative, label), ...)}
    target_terms: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = {}
    trainable: ClassVar[bool] = True  # the trainers take it
    # text encoders --train_text_encoder and --train_token_embedding train (none: not supported),
    # and the regex of their modules the text-encoder adapter takes by default
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ()
    text_encoder_targets: ClassVar[str | None] = None
    fsdp: ClassVar[bool] = True  # train_subject.py may shard it
    quantized_base: ClassVar[bool] = True  # --quantize_base may load its denoiser in 8/4 bit
    diffusers_loads_lora: ClassVar[bool] = True  # the pipeline has diffusers' load_lora_weights
    one_step: ClassVar[bool] = True  # train_one_step.py (HiPA) may train it

    # --- export -------------------------------------------------------------------------
    lora_layouts: ClassVar[dict[str, LoraKeyLayout]] = {}  # by export format (kohya, comfyui)
    export_refusals: ClassVar[dict[str, str]] = {}  # format -> why not, and what to use instead
    diff_layout: ClassVar[str] = "comfyui"  # whose module names the lossless .diff export uses
    base_version: ClassVar[str | None] = None  # kohya's ss_base_model_version
    single_file_layout: ClassVar[str | None] = None  # the original checkpoint layout it writes

    # ====================================================================================
    # without a model
    # ====================================================================================

    @classmethod
    def tiny_name(cls) -> str | None:
        """``tiny-<name>`` (its built-in is ``builtin:tiny-<name>``); None without one."""
        return f"tiny-{cls.name}" if cls.tiny_denoiser_config is not None else None

    @classmethod
    def tiny_options(cls, name: str) -> dict[str, Any]:
        """The `build_tiny` options of the built-in ``tiny-<...>`` ``name`` (a `tiny_variants` entry)."""
        return dict(cls.tiny_variants.get(name.removeprefix("tiny-"), {}))

    @classmethod
    def relatives_prefix(cls) -> str:
        """The class-name prefix of the family's pipelines (``Flux`` for FluxFillPipeline, ...)."""
        return cls.pipeline_prefix or cls.pipeline_classes[0].removesuffix("Pipeline")

    @classmethod
    def build_tiny(cls, seed: int = 0, **options: Any) -> Any:
        """The tiny built-in pipeline (its first pipeline class): random weights from ``seed``, the
        denoiser first, then `tiny_components`; no download."""
        import diffusers

        if cls.tiny_denoiser_config is None:
            raise DifftuneError(f"the {cls.title} family has no tiny built-in")
        torch.manual_seed(seed)
        components = {cls.denoiser_component: cls.tiny_denoiser(), **cls.tiny_components(**options)}
        pipe = getattr(diffusers, cls.pipeline_classes[0])(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def tiny_components(cls, **options: Any) -> dict[str, Any]:
        """Everything the tiny pipeline holds besides its denoiser (VAE, text encoders, tokenizers,
        scheduler), built in a fixed order: the same seed gives the same weights."""
        raise DifftuneError(f"the {cls.title} family has no tiny built-in")

    @classmethod
    def tiny_denoiser(cls) -> nn.Module:
        """The denoiser of the tiny built-in alone, with random weights (seed torch first)."""
        return build_model(cls.denoiser_class, cls.tiny_denoiser_config)

    @classmethod
    def describe_tiny(cls, options: Mapping[str, Any] | None = None) -> ModelDescription:
        """`ModelDescription` of the tiny built-in (built with ``options``), from its configs."""
        config = cls.tiny_denoiser_config
        scale = 2 ** (len(cls.tiny_vae_widths) - 1)
        return ModelDescription(cls.name, TINY_SAMPLE_SIZE * scale, cls.denoiser_class, dict(config),
                                cls.side_multiple(config, scale), cls.tiny_vae_widths[0],
                                cls.tiny_experts(options or {}), cls.frame_multiple({}))

    @classmethod
    def side_multiple(cls, denoiser_config: Mapping[str, Any], vae_scale_factor: int) -> int:
        """Image sides must be multiples of this: the latent patch in pixels, and what the family's
        diffusers pipeline itself accepts (`pipeline_side_multiple`)."""
        return math.lcm(int(vae_scale_factor) * cls.latent_patch(denoiser_config), cls.pipeline_side_multiple)

    @classmethod
    def tiny_experts(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The experts (`expert_components`) of the tiny built-in made with ``options``."""
        return ()

    @classmethod
    def model_experts(cls, model_index: Mapping[str, Any]) -> tuple[str, ...]:
        """The experts a saved pipeline holds, from its model_index.json (none: one denoiser)."""
        return ()

    @classmethod
    def vae_scale_factor(cls, vae_config: Mapping[str, Any]) -> int:
        """How many pixels one latent pixel covers along a side, from the VAE's config."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def vae_width(cls, vae_config: Mapping[str, Any]) -> int:
        """Channels of the VAE encoder's first block (`ModelDescription.vae_width`)."""
        return int(vae_config["block_out_channels"][0])

    @classmethod
    def frame_multiple(cls, vae_config: Mapping[str, Any]) -> int:
        """A video VAE's temporal compression: clips have 1 + k·this frames (1 for images)."""
        return 1

    @classmethod
    def latent_patch(cls, denoiser_config: Mapping[str, Any]) -> int:
        """Side of the latent patch one token covers (1 for a UNet)."""
        return cls.latent_packing * int(denoiser_config.get("patch_size") or 1)

    @classmethod
    def native_resolution(cls, denoiser_config: Mapping[str, Any], vae_scale_factor: int) -> int:
        """The resolution in pixels the model was trained at."""
        return int(denoiser_config.get("sample_size") or cls.default_sample_size) * int(vae_scale_factor)

    @classmethod
    def latent_channels(cls, denoiser_config: Mapping[str, Any]) -> int:
        """Channels of the VAE latent (the denoiser takes ``latent_packing``² times as many)."""
        return int(denoiser_config["in_channels"]) // cls.latent_packing**2

    @classmethod
    def pack_latents(cls, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the pipeline's ``latents=`` argument takes them (the same for most families)."""
        return latents

    @classmethod
    def denoiser_sample(cls, latents: torch.Tensor) -> Any:
        """Latents as the denoiser's sample argument takes them (most pipelines pass theirs unchanged)."""
        return cls.pack_latents(latents)

    @classmethod
    def unpack_latents(cls, latents: torch.Tensor, height: int, width: int,
                       vae_scale_factor: int, vae: Any = None) -> torch.Tensor:
        """A pipeline's ``output_type="latent"`` result in the VAE's latent layout (normalised as
        training sees it; ``vae``: the pipeline's, for families whose pipelines return it raw)."""
        return latents

    @classmethod
    def normalize_latents(cls, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """A VAE latent as the denoiser sees it (shifted and scaled by the VAE's factors)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @classmethod
    def denormalize_latents(cls, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """What `normalize_latents` undoes, as the pipeline does before decoding (per-channel
        statistics where the VAE's config has them)."""
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
            return latents * std / cfg.scaling_factor + mean
        return latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)

    @classmethod
    def decode_latents(cls, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Latents (normalised, the VAE's layout) to pixels in about [-1, 1]; differentiable."""
        return vae.decode(cls.denormalize_latents(vae, latents.to(vae.dtype)), return_dict=False)[0]

    @classmethod
    def guidance_kwargs(cls, scale: float | None) -> dict[str, Any]:
        """Pipeline arguments for classifier-free guidance at ``scale`` (1: none); {} for None."""
        if scale is None:
            return {}
        return {cls.guidance_argument: cls.unguided_scale + scale - 1.0}

    @classmethod
    def applicable_flags(cls) -> tuple[str, ...]:
        return (*cls.process_flags, *cls.family_flags)

    @classmethod
    def export_refusal(cls, fmt: str) -> str | None:
        """Why this family cannot be exported in ``fmt`` (None: it can); `families.check_export_format`
        adds what other families can do."""
        if fmt in cls.export_refusals:
            return cls.export_refusals[fmt]
        if fmt in ("kohya", "comfyui") and fmt not in cls.lora_layouts:
            return f"the {cls.title} family has no {fmt} LoRA names"
        if fmt == "diff" and cls.diff_layout not in cls.lora_layouts:
            return f"the {cls.title} family has no module names for a diff file"
        return None

    @classmethod
    def diffusers_lora_loading(cls, component: str) -> tuple[str, dict[str, Any]]:
        """The key prefix a LoRA of ``component`` needs for the pipeline's ``load_lora_weights``, and the
        arguments that load it into that component (the same prefix, none, for most)."""
        return component, {}

    @classmethod
    def single_file_state_dict(cls, pipeline: Any) -> dict[str, torch.Tensor]:
        """Every weight of a (merged) pipeline under its original checkpoint name."""
        raise DifftuneError(f"no single-file layout for a {cls.title} pipeline")

    @classmethod
    def single_file_states(cls, pipeline: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The state dicts (views, no copies) a single file is made of, by component: taken before an
        adapter wraps the modules (`single_file_entries`)."""
        raise DifftuneError(f"no single-file layout for a {cls.title} pipeline")

    @classmethod
    def single_file_entries(cls, pipeline: Any, states: dict[str, dict[str, torch.Tensor]] | None = None,
                            replace: Callable[[str, str], torch.Tensor | None] | None = None
                            ) -> dict[str, Any]:
        """`single_file_state_dict` with each weight made when written (`adapter_file.LazyTensor`), from
        ``states`` and with ``replace(component, key)``'s tensor instead where it gives one: a merged
        model streams to disk one weight at a time."""
        raise DifftuneError(f"no single-file layout for a {cls.title} pipeline")

    @classmethod
    def modules_without_gradient(cls, denoiser: nn.Module) -> set[str]:
        """Modules whose output the denoiser's result never depends on (their adapters get no gradient)."""
        return set()

    # ====================================================================================
    # bound to a pipeline, for training
    # ====================================================================================

    def __init__(self, pipeline: Any, device: torch.device, options: LossOptions):
        self.pipeline = pipeline
        self.device = torch.device(device)
        defaults = {k: v for k, v in self.option_defaults.items() if getattr(options, k) is None}
        self.options = dataclasses.replace(options, **defaults)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_component)

    def trained_denoisers(self) -> dict[str, nn.Module]:
        """The denoisers training adapts, by component, `denoiser` first (more than one: several experts
        that train together, each on the examples of its noise range)."""
        return {self.denoiser_component: self.denoiser}

    @property
    def text_encoders(self) -> list[nn.Module]:
        encoders = (getattr(self.pipeline, name, None) for name in self.text_encoder_components)
        return [encoder for encoder in encoders if encoder is not None]

    def free_text_encoders(self) -> None:
        """Drop the text encoders from the pipeline (``--free_text_encoder``): every prompt is encoded."""
        for name in self.text_encoder_components:
            if getattr(self.pipeline, name, None) is not None:
                setattr(self.pipeline, name, None)

    # --- prompts ------------------------------------------------------------------------

    def encode_prompt_kwargs(self, prompts: list[str], with_negative: bool) -> dict[str, Any]:
        """Arguments of the pipeline's ``encode_prompt``."""
        return {"prompt": prompts, "device": self.device, "num_images_per_prompt": 1,
                "do_classifier_free_guidance": with_negative}

    def encode_prompts(self, prompts: list[str], with_negative: bool = False) -> dict[str, torch.Tensor]:
        """Prompt embeddings keyed by the pipeline's argument names (``prompt_embeds``, ...).

        With ``with_negative`` also the unconditional ones (``negative_prompt_embeds``, ...)
        that classifier-free guidance needs.
        """
        outputs = self.pipeline.encode_prompt(**self.encode_prompt_kwargs(prompts, with_negative))
        named = zip(self.prompt_outputs, outputs, strict=True)
        return {name: value for name, value in named if name is not None and value is not None
                and (with_negative or not name.startswith("negative_"))}

    def pipeline_prompt_kwargs(self, prompt: str) -> dict[str, torch.Tensor]:
        """Arguments that let the pipeline sample ``prompt`` without its text encoders."""
        with torch.no_grad():
            return self.encode_prompts([prompt], with_negative=True)

    # --- images -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior parameters (mean and log-variance on channels), in float32."""
        vae = self.pipeline.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return posterior.parameters.float()

    def latents_from_moments(self, moments: torch.Tensor,
                             generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Sample the posterior per example (or take its mode, `sample_posterior`) and normalise as
        the denoiser expects."""
        mean, logvar = moments.chunk(2, dim=1)
        sample = mean
        if self.sample_posterior:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            sample = mean + std * randn_per_example(mean.shape[1:], generators, mean.device)
        return self.normalize_latents(self.pipeline.vae, sample)

    # --- noise and loss -----------------------------------------------------------------

    def sample_noise(self, latents: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        noise = randn_per_example(latents.shape[1:], generators, latents.device)
        if self.options.noise_offset:
            channels = (latents.shape[1],) + (1,) * (latents.dim() - 2)
            offset = randn_per_example(channels, generators, latents.device)
            noise = noise + self.options.noise_offset * offset
        return noise

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor,
                  generators: Sequence[torch.Generator]) -> NoisyInput:
        """Draw timesteps per example, noise the latents, give the target and weights."""

    # --- the denoiser call --------------------------------------------------------------

    def denoiser_timestep(self, noisy: NoisyInput) -> torch.Tensor:
        """The timesteps in the units the denoiser takes."""
        return noisy.timesteps

    def extra_model_kwargs(self, noisy: NoisyInput, batch: TrainingBatch) -> dict[str, Any]:
        """Further denoiser arguments (micro-conditioning, position ids, guidance)."""
        return {}

    def model_kwargs(self, noisy: NoisyInput, batch: TrainingBatch) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward call."""
        prompts = {argument: batch.conditioning[key] for argument, key in self.conditioning_arguments.items()}
        return {self.sample_argument: self.denoiser_sample(noisy.model_input),
                "timestep": self.denoiser_timestep(noisy), **prompts, **self.extra_model_kwargs(noisy, batch)}

    def predict(self, model: nn.Module, noisy: NoisyInput, batch: TrainingBatch) -> torch.Tensor:
        """The denoiser output, in the space of ``noisy.target``."""
        output = model(**self.model_kwargs(noisy, batch), return_dict=False)[0]
        return self.output_to_latent(output, noisy)

    def output_to_latent(self, output: torch.Tensor, noisy: NoisyInput) -> torch.Tensor:
        """The denoiser output in the latent's layout."""
        return output

    @staticmethod
    def per_example_loss(prediction: torch.Tensor, noisy: NoisyInput) -> torch.Tensor:
        """Weighted mean squared error of each example, in float32."""
        error = (prediction.float() - noisy.target.float()) ** 2
        return error.flatten(1).mean(1) * noisy.weights


class DDPMFamily(ModelFamily):
    """DDPM training (SD 1.x/2.x, SDXL, PixArt): ε, v or x0 targets, optional Min-SNR weighting."""

    process_title = "DDPM noise"
    process_flags = ("snr_gamma", "prediction_type")

    def __init__(self, pipeline: Any, device: torch.device, options: LossOptions):
        from diffusers import DDPMScheduler

        super().__init__(pipeline, device, options)
        overrides = {"prediction_type": options.prediction_type} if options.prediction_type else {}
        self.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, **overrides)
        if options.prediction_type:  # sample with the same parameterisation
            pipeline.scheduler.register_to_config(prediction_type=options.prediction_type)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def add_noise(self, latents, noise, generators):
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return NoisyInput(noisy, timesteps, target, self.snr_weights(timesteps))

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights (1 without ``snr_gamma``)."""
        gamma = self.options.snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if self.prediction_type == "epsilon":
            return clipped / snr
        return clipped


class FlowMatchingFamily(ModelFamily):
    """Rectified-flow training as in diffusers' SD3 and Flux DreamBooth scripts.

    Timesteps and sigmas come from a copy of the pipeline's scheduler, as there: a static
    ``shift`` (SD3) is in its sigmas; with dynamic shifting (FLUX.1) they are unshifted.
    """

    process_title = "flow matching"
    process_flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")
    # diffusers' SD3 DreamBooth script
    option_defaults = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                       "mode_scale": 1.29}

    def __init__(self, pipeline: Any, device: torch.device, options: LossOptions):
        super().__init__(pipeline, device, options)
        # A private copy: sampling calls set_timesteps on the pipeline's scheduler.
        self.scheduler = self.training_scheduler()

    def training_scheduler(self) -> Any:
        """The flow-matching scheduler whose timesteps and sigmas training draws from."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)

    def add_noise(self, latents, noise, generators):
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        opts = self.options
        scheme = self.weighting_scheme
        density = torch.cat([
            compute_density_for_timestep_sampling(scheme, 1, opts.logit_mean, opts.logit_std,
                                                  opts.mode_scale, generator=g)
            for g in generators])
        steps = self.scheduler.config.num_train_timesteps
        indices = (density * steps).long().clamp(0, steps - 1)
        timesteps = self.scheduler.timesteps[indices].to(latents.device)
        sigmas = self.scheduler.sigmas[indices].to(latents.device, latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if opts.precondition_outputs else noise - latents
        weights = compute_loss_weighting_for_sd3(scheme, sigmas).flatten().float()
        return NoisyInput(noisy, timesteps, target, weights, sigmas)

    @property
    def weighting_scheme(self) -> str:
        return self.options.weighting_scheme

    def predict(self, model, noisy, batch):
        prediction = super().predict(model, noisy, batch)
        if self.options.precondition_outputs:  # x0 = x_t - σ·v
            prediction = prediction * (-noisy.sigmas) + noisy.model_input
        return prediction
