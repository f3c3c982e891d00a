"""Export difftune adapters to the files ComfyUI, A1111/Forge, kohya sd-scripts and diffusers load.

    difftune.export_adapter("out/adapter.safetensors", "out/lora_kohya.safetensors", "kohya")
    python -m difftune.export out/adapter.safetensors --format kohya --output out/lora_kohya.safetensors

Formats:
- ``kohya``: ``lora_unet_*.lora_down/lora_up/alpha``. Exact for LoRA (its real alpha, conv kernels
  kept). Other methods: ΔW = W_adapted − W0 per layer, truncated by SVD at ``rank`` or ``energy``,
  with the error reported per layer, overall, and as the PSNR of images against the adapter.
- ``comfyui``: a LoRA file under the names ComfyUI maps for the family (its `LoraKeyLayout`:
  the same as ``kohya`` for the UNet families, OneTrainer's ``lora_transformer_*`` for SD3,
  ai-toolkit's ``transformer.*.lora_A/lora_B`` for FLUX.1).
- ``diff``: lossless full ΔW per changed tensor (``.diff``/``.diff_b``, LyCORIS' keys).
- ``diffusers``: a merged pipeline folder (``save_pretrained``).
- ``single-file``: a merged checkpoint in the family's original key layout (SD 1.x, SDXL).

Which family takes which format is the family's own business (`difftune.families`): a format it
cannot be written in is refused by `check_export_options`, before any model loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter_file import (
    EXPERTS,
    TOKEN_EMBEDDINGS,
    AdapterFile,
    LazyTensor,
    read_safetensors,
    write_safetensors,
)
from ..api import (
    adapted_text_encoders,
    adapter_view,
    find_denoiser,
    has_adapter,
    load_adapter,
    read_adapter_info,
    remove_adapter,
)
from ..errors import DifftuneError
from ..families import (
    EXPORT_FORMATS,
    ModelFamily,
    check_export_format,
    check_export_modules,
    family_of,
    get_family,
)
from ..io import atomic_write_folder, write_text
from ..sampling import GenerationSettings, generate_images, save_grid
from ..tuners import get_method
from .coverage import comfyui_maps
from .deltas import adapter_deltas, changed_tensors, factor_deltas, merged_and_base, weights_replaced
from .formats import diff_tensors, lora_factors_from_svd, lora_tensors

FORMATS = EXPORT_FORMATS
LORA_FORMATS = ("kohya", "comfyui")
EXPORT_METADATA_KEY = "difftune_export"
DEFAULT_PROMPT = "a photo"

OUTPUT_NAMES = {
    "kohya": "adapter_kohya.safetensors",
    "comfyui": "adapter_comfyui.safetensors",
    "diff": "adapter_diff.safetensors",
    "diffusers": "merged_diffusers",
    "single-file": "merged_single_file.safetensors",
}

__all__ = ["FORMATS", "ExportReport", "check_export_options", "default_output", "export_adapter",
           "write_diffusers_lora_files"]
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' per-component LoRA config in the header


def default_output(adapter_path: str | os.PathLike, fmt: str) -> Path:
    """Where an export goes when no --output is given: beside the adapter file."""
    path = Path(adapter_path)
    folder = path if path.is_dir() else path.parent
    return folder / OUTPUT_NAMES[fmt]


@dataclasses.dataclass
class ExportReport:
    """What an export wrote and what it costs: per-layer and overall relative Frobenius error
    ‖ΔW − ΔW_export‖ / ‖ΔW‖ and the PSNR of samples against the adapter itself."""

    path: str
    format: str
    method: str
    family: str
    exact: bool
    size_bytes: int
    rank: int | None = None
    energy: float | None = None
    relative_error: float | None = None
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    not_representable: dict[str, float] = dataclasses.field(default_factory=dict)
    # changed tensors the target tool has no key for (ComfyUI: text-encoder norms), left out: ‖Δ‖_F
    not_in_comfyui: dict[str, float] = dataclasses.field(default_factory=dict)
    psnr_db: float | None = None
    base_psnr_db: float | None = None  # the base model's images against the adapter's: what "no export" gives
    identical_images: bool | None = None
    images: str | None = None
    sampling: dict[str, Any] | None = None

    def summary(self) -> str:
        lines = [
            f"{self.format} export of a {self.method} adapter ({self.family}): {self.path} "
            f"({self.size_bytes / 2**20:.2f} MiB, {'exact' if self.exact else 'approximate'})"
        ]
        if self.relative_error is not None and self.layers:  # an SVD extraction
            ranks = sorted({layer["rank"] for layer in self.layers})
            rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"
            lines.append(
                f"  {len(self.layers)} layers at {rank_text}: relative Frobenius error "
                f"{self.relative_error:.4f} overall, worst layer "
                f"{max(layer['relative_error'] for layer in self.layers):.4f}"
            )
        if self.not_representable:
            lines.append(
                f"  {len(self.not_representable)} changed biases/norms have no LoRA form and are "
                "left out (counted in the error); --format diff keeps them"
            )
        if self.not_in_comfyui:
            names = sorted(self.not_in_comfyui)
            lines.append(
                f"  {len(names)} changed text-encoder tensors have no key in ComfyUI's loader (it maps "
                f"the CLIP layers' attention and MLP projections only) and are left out (relative error "
                f"{self.relative_error:.4f}): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} "
                "(all named in the report)"
            )
        if self.identical_images:
            lines.append(f"  images: identical to the adapter's ({self.images})")
        elif self.psnr_db is not None:
            lines.append(
                f"  images: PSNR {self.psnr_db:.2f} dB against the adapter's (the base model without it: "
                f"{self.base_psnr_db:.2f} dB) ({self.images})"
            )
        return "\n".join(lines)


def check_export_options(method: str, config: Mapping[str, Any], family: str, fmt: str, rank: int | None,
                         energy: float | None) -> None:
    """Refuse a format the family (a name) cannot be written in, or a missing/contradictory --rank/--energy
    for the adapter (its method and options ``config``), before anything heavy runs."""
    if fmt not in FORMATS:
        raise DifftuneError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if rank is not None and energy is not None:
        raise DifftuneError("give --rank or --energy, not both")
    if rank is not None and rank < 1:
        raise DifftuneError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise DifftuneError(f"--energy must be in (0, 1], got {energy}")
    check_export_format(get_family(family), fmt)
    refusal = get_method(method).exact_lora_refusal(config)
    if fmt in LORA_FORMATS and refusal and rank is None and energy is None:
        raise DifftuneError(f"{refusal}: give --rank R or --energy E for its SVD extraction, or use "
                            "--format diff (lossless)")
    if fmt not in LORA_FORMATS and (rank is not None or energy is not None):
        raise DifftuneError(f"--rank/--energy only apply to --format kohya/comfyui, not {fmt}")


def check_experts_export(info: Mapping[str, Any], fmt: str, source: Any) -> None:
    """A file of several experts (Wan 2.2 --expert both) has no one-file form in other tools' layouts:
    ComfyUI loads each expert as a model of its own, with a LoRA of its own."""
    experts = sorted(info.get(EXPERTS, {}))
    if experts and fmt not in ("diffusers",):
        raise DifftuneError(
            f"{source}: adapts {info['component']} and {', '.join(experts)} (two experts); a --format {fmt} "
            "file holds one model's LoRA and ComfyUI loads each expert as its own model: train one run per "
            "expert (--expert high, --expert low) and export each, or use the per-expert diffusers files "
            "the trainer writes (pytorch_lora_weights*.safetensors) or --format diffusers")


def export_adapter(
    adapter_path: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    format: str = "kohya",
    *,
    weights: Sequence[float] | None = None,
    base_model: str | None = None,
    pipeline: Any = None,
    rank: int | None = None,
    energy: float | None = None,
    psnr_images: int = 2,
    prompt: str = DEFAULT_PROMPT,
    num_inference_steps: int = 20,
    seed: int = 0,
    resolution: int | tuple[int, int] | None = None,  # a side, or height and width
) -> ExportReport:
    """Write ``adapter_path`` in ``format`` to ``output`` and return the report (also written as
    ``<output>.report.json``, with an image grid base | adapter | export when images are compared,
    at ``resolution``, default the model's own).

    ``pipeline`` (a loaded base pipeline without an adapter) saves loading ``base_model`` (default:
    the base named in the adapter's header); it is left without an adapter afterwards.

    A list of adapter files (any methods) is written as one: ΔW = Σ wᵢ·ΔWᵢ with ``weights`` (default 1
    each), exact LoRA factors side by side when every file is a LoRA, else as one ΔW per tensor.
    """
    from ..model_factory import describe_model, load_pipeline

    paths = [adapter_path] if isinstance(adapter_path, (str, os.PathLike)) else list(adapter_path)
    if not paths:
        raise DifftuneError("export_adapter: no adapter path given")
    if weights is not None and len(weights) != len(paths):
        raise DifftuneError(f"export_adapter: {len(paths)} adapters but {len(weights)} weights")
    infos = [read_adapter_info(path) for path in paths]
    for path, each in zip(paths, infos, strict=True):
        check_experts_export(each, format, path)
        if TOKEN_EMBEDDINGS in each:  # difftune.training.pivotal
            tokens = ", ".join(each[TOKEN_EMBEDDINGS]["tokens"])
            raise DifftuneError(f"{path}: carries new token embeddings ({tokens}), which a {format} "
                                "export has no place for; use the difftune file (difftune.load_adapter)")
    info = dict(infos[0], method="+".join(each["method"] for each in infos))
    output = Path(output)
    if pipeline is None:
        base_model = base_model or info.get("base_model")
        if not base_model:
            raise DifftuneError(f"{adapter_path}: the header names no base model; pass --base")
        # every option is checked before the weights load
        described = describe_model(base_model)
        family_name = described.family
        for each in infos:
            check_export_options(each["method"], each["config"], family_name, format, rank, energy)
            check_export_modules(get_family(family_name), format, each.get("targets", ()),
                                 described.denoiser_config)
        pipeline = load_pipeline(base_model)
    elif has_adapter(pipeline):
        raise DifftuneError("export_adapter: the pipeline already carries an adapter")
    family = family_of(pipeline)
    for each in infos:
        check_export_options(each["method"], each["config"], family.name, format, rank, energy)

    # the bare model's state dicts (views), before the adapter wraps its modules
    states = family.single_file_states(pipeline) if format == "single-file" else None
    if len(paths) == 1 and weights is None:
        load_adapter(pipeline, paths[0])
    else:
        for index, (path, weight) in enumerate(zip(paths, weights or [1.0] * len(paths), strict=True)):
            load_adapter(pipeline, path, scale=weight, adapter_name=f"adapter_{index}")
    try:
        if format == "single-file":
            return _export_single_file(pipeline, output, info["method"], family, states)
        if format == "diffusers":
            return _export_merged(pipeline, output, format, info["method"], family)
        sampling = _Sampling(psnr_images, prompt, num_inference_steps, seed, resolution)
        return _export_weights(pipeline, output, format, info, family, rank, energy, sampling)
    finally:
        if has_adapter(pipeline):
            remove_adapter(pipeline)


def diffusers_lora_name(family: type[ModelFamily], component: str) -> str:
    """``pytorch_lora_weights.safetensors`` (diffusers' default name) for the family's denoiser,
    ``pytorch_lora_weights_<component>.safetensors`` for another expert's."""
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    if component == family.denoiser_component:
        return LORA_WEIGHT_NAME_SAFE
    return LORA_WEIGHT_NAME_SAFE.replace(".safetensors", f"_{component}.safetensors")


def write_diffusers_lora_files(adapter_path: str | os.PathLike, output_dir: str | os.PathLike,
                               family: type[ModelFamily]) -> dict[str, dict[str, Any]]:
    """One diffusers LoRA file per denoiser of a LoRA adapter file (its own and its experts'), each
    under the key prefix the pipeline's ``load_lora_weights`` reads for that denoiser
    (`ModelFamily.diffusers_lora_loading`), with its part of diffusers' metadata; returns each file's
    name and the ``load_lora_weights`` arguments that load it where it belongs."""
    file = AdapterFile.read(adapter_path)
    tensors, header = read_safetensors(file.source)
    metadata = json.loads(header.get(DIFFUSERS_METADATA_KEY, "{}"))
    names = {}
    for component in (file.component, *file.experts):
        prefix, load_kwargs = family.diffusers_lora_loading(component)

        def renamed(mapping: Mapping[str, Any], component: str = component, prefix: str = prefix) -> dict:
            return {f"{prefix}.{key[len(component) + 1:]}": value for key, value in mapping.items()
                    if key.startswith(f"{component}.")}

        name = diffusers_lora_name(family, component)
        header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(renamed(metadata), sort_keys=True)}
        write_safetensors(Path(output_dir) / name, renamed(tensors), header)
        names[name] = load_kwargs
    return names


def _export_merged(pipeline: Any, output: Path, fmt: str, method: str,
                   family: type[ModelFamily]) -> ExportReport:
    """The merged pipeline as a diffusers folder; the pipeline is left at its base."""
    merged = {
        part: {name: pair[0] for name, pair in tensors.items()}
        for part, tensors in merged_and_base(pipeline).items()
    }
    with weights_replaced(pipeline, merged):
        _save_folder_atomically(pipeline, output)
        size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    report = ExportReport(str(output), fmt, method, family.name, exact=True, size_bytes=size)
    _write_report(report)
    return report


def _export_single_file(pipeline: Any, output: Path, method: str, family: type[ModelFamily],
                        states: dict[str, dict[str, torch.Tensor]]) -> ExportReport:
    """The merged model in the family's original layout, streamed: each weight the adapter changes is
    merged on its own when the writer reaches it (`deltas.changed_tensors`), the others written from
    the model's own memory, so the export holds about one tensor beside the model."""
    sources = changed_tensors(pipeline)

    def merged(component: str, key: str) -> torch.Tensor | None:
        pair = sources.get(component, {}).get(key)
        return None if pair is None else pair()[0]

    facts = {"method": method, "format": "single-file", "family": family.name}
    metadata = {"format": "pt", EXPORT_METADATA_KEY: json.dumps(facts)}
    write_safetensors(output, family.single_file_entries(pipeline, states, merged), metadata)
    report = ExportReport(str(output), "single-file", method, family.name, exact=True,
                          size_bytes=output.stat().st_size)
    _write_report(report)
    return report


def _save_folder_atomically(pipeline: Any, output: Path) -> None:
    """``save_pretrained`` into a fresh folder beside ``output``, then swap it in: an interrupted
    export never leaves a half-written pipeline where one was."""
    if output.exists() and not output.is_dir():
        raise DifftuneError(f"--output {output}: a file is there; --format diffusers writes a folder")
    atomic_write_folder(output, pipeline.save_pretrained)


def _components(pipeline: Any) -> dict[str, Any]:
    denoiser, component = find_denoiser(pipeline)
    return {component: denoiser, **adapted_text_encoders(pipeline)}


@dataclasses.dataclass(frozen=True)
class _Sampling:
    """The images an export compares: how many, of which prompt, steps, seed and size."""

    images: int
    prompt: str
    steps: int
    seed: int
    resolution: int | tuple[int, int] | None  # a side, or height and width


def _export_weights(
    pipeline: Any,
    output: Path,
    fmt: str,
    info: dict[str, Any],
    family: type[ModelFamily],
    rank: int | None,
    energy: float | None,
    sampling: _Sampling,
) -> ExportReport:
    method = info["method"]
    denoiser_config = find_denoiser(pipeline)[0].config
    layout = family.lora_layouts[family.diff_layout if fmt == "diff" else fmt]
    # another tool's file of a further expert (Wan 2.2's transformer_2) is imported into the first one,
    # so only files of the family's own denoiser are compared by their images
    compared = fmt != "diff" and find_denoiser(pipeline)[1] == family.denoiser_component
    reference = _sample(pipeline, family, sampling) if compared else None
    tensors: dict[str, torch.Tensor] = {}
    report = ExportReport(
        str(output), fmt, method, family.name, exact=False, size_bytes=0, rank=rank, energy=energy
    )
    if fmt in LORA_FORMATS and rank is None and energy is None:  # the method's own LoRA factors
        for component, model in _components(pipeline).items():
            factors = adapter_view(model).lora_factors()
            tensors.update(lora_tensors(layout, component, factors, denoiser_config))
        remove_adapter(pipeline)
        report.exact = True
    elif fmt == "diff":
        tensors, written_norms = _diff_entries(report, pipeline, layout, denoiser_config)
    else:
        deltas = adapter_deltas(pipeline)  # the pipeline is back at the base model
        _factor_into(report, tensors, deltas, layout, denoiser_config, rank, energy)
    metadata = {
        "format": "pt",
        EXPORT_METADATA_KEY: json.dumps(
            {
                "method": method,
                "format": fmt,
                "family": family.name,
                "exact": report.exact,
                "rank": rank,
                "energy": energy,
                "relative_error": report.relative_error,
                "base_model": info.get("base_model"),
            }
        ),
    }
    if fmt in LORA_FORMATS:
        metadata["ss_network_module"] = "networks.lora"
        if family.base_version:
            metadata["ss_base_model_version"] = family.base_version
    write_safetensors(output, tensors, metadata)
    if fmt == "diff":
        _diff_error(report, written_norms)
    report.size_bytes = output.stat().st_size
    if reference:
        _compare_images(report, pipeline, family, reference, output, sampling)
    _write_report(report)
    return report


def _diff_entries(report: ExportReport, pipeline: Any, layout: Any, denoiser_config: Any
                  ) -> tuple[dict[str, LazyTensor], list[float]]:
    """Every changed tensor's ΔW under its diff key, each computed when the writer reaches it
    (`deltas.changed_tensors`), and the list their norms ‖Δ‖_F go to as they are written. Text-encoder
    tensors ComfyUI has no key for (`coverage`) are left out and named in ``report.not_in_comfyui``."""
    entries: dict[str, LazyTensor] = {}
    written: list[float] = []
    models = _components(pipeline)  # before changed_tensors, which may remove the adapters
    for component, pairs in changed_tensors(pipeline).items():
        kept = {}
        for name, pair in pairs.items():
            if comfyui_maps(layout, component, name):
                module, _, attribute = name.rpartition(".")
                shape = tuple(getattr(models[component].get_submodule(module), attribute).shape)
                kept[name] = LazyTensor(shape, torch.float32, functools.partial(_delta_of, pair, written))
            else:
                report.not_in_comfyui[f"{component}.{name}"] = float(_delta_of(pair).double().norm())
        entries.update(diff_tensors(layout, component, kept, denoiser_config))
    return entries, written


def _delta_of(pair: Any, norms: list[float] | None = None) -> torch.Tensor:
    """ΔW = merged − base in float32, its norm appended to ``norms``."""
    merged, base = pair()
    delta = merged.float() - base.float()
    if norms is not None:
        norms.append(float(delta.double().norm()))
    return delta


def _diff_error(report: ExportReport, written: list[float]) -> None:
    """A diff is exact for what it holds: its error is what it left out, against the whole change."""
    left = sum(norm**2 for norm in report.not_in_comfyui.values())
    total = left + sum(norm**2 for norm in written)
    report.exact = not report.not_in_comfyui
    report.relative_error = math.sqrt(left / total) if left and total > 0 else None


def _factor_into(
    report: ExportReport,
    tensors: dict[str, torch.Tensor],
    deltas: dict[str, dict[str, torch.Tensor]],
    layout: Any,
    denoiser_config: Any,
    rank: int | None,
    energy: float | None,
) -> None:
    residual_sq = total_sq = 0.0
    for component, part in deltas.items():
        factors, dropped = factor_deltas(part, rank, energy, f"SVD of the {component}'s ΔW")
        tensors.update(lora_tensors(layout, component, lora_factors_from_svd(factors), denoiser_config))
        for module, each in factors.items():
            report.layers.append(
                {
                    "component": component,
                    "module": module,
                    "shape": list(part[f"{module}.weight"].shape),
                    "rank": each.rank,
                    "relative_error": each.relative_error,
                    "norm": each.norm,
                }
            )
            residual_sq += each.residual**2
            total_sq += each.norm**2
        for name, norm in dropped.items():
            report.not_representable[f"{component}.{name}"] = norm
            residual_sq += norm**2
            total_sq += norm**2
    if not report.layers:
        raise DifftuneError(
            "the adapter changes no Linear or Conv2d weight: nothing to factor into a LoRA; use --format diff"
        )
    report.relative_error = math.sqrt(residual_sq / total_sq) if total_sq > 0 else 0.0


def _sample(pipeline: Any, family: type[ModelFamily], sampling: _Sampling) -> list[Any]:
    """The images compared; a video model's shortest clips (1 + its frame multiple), frame by frame."""
    if sampling.images <= 0:
        return []
    denoiser, _ = find_denoiser(pipeline)
    vae_scale = family.vae_scale_factor(pipeline.vae.config)
    resolution = sampling.resolution or family.native_resolution(denoiser.config, vae_scale)
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    frames = 1 + family.frame_multiple(pipeline.vae.config) if family.video else None
    settings = GenerationSettings(images_per_prompt=sampling.images, seed=sampling.seed,
                                  num_inference_steps=sampling.steps, guidance_scale=None, height=height,
                                  width=width, batch_size=1, num_frames=frames)
    samples = generate_images(pipeline, [sampling.prompt], settings, show_progress=False)[0]
    return [frame for clip in samples for frame in clip] if family.video else samples


def psnr(reference: list[Any], images: list[Any]) -> float:
    """PSNR in dB of 8-bit images against a reference (inf when identical)."""
    a = np.stack([np.asarray(i.convert("RGB"), dtype=np.float64) / 255 for i in reference])
    b = np.stack([np.asarray(i.convert("RGB"), dtype=np.float64) / 255 for i in images])
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _compare_images(
    report: ExportReport,
    pipeline: Any,
    family: type[ModelFamily],
    reference: list[Any],
    output: Path,
    sampling: _Sampling,
) -> None:
    """Samples from the exported file (imported as other tools' files are) against the adapter's."""
    base = _sample(pipeline, family, sampling)
    load_adapter(pipeline, output)
    try:
        exported = _sample(pipeline, family, sampling)
    finally:
        remove_adapter(pipeline)
    value = psnr(reference, exported)
    report.base_psnr_db = psnr(reference, base)
    report.identical_images = math.isinf(value)
    report.psnr_db = None if math.isinf(value) else value
    grid = output.with_name(output.name + ".compare.png")
    save_grid([*base, *reference, *exported], grid, columns=sampling.images)
    report.images = str(grid)
    report.sampling = {
        "prompt": sampling.prompt,
        "images": sampling.images,
        "steps": sampling.steps,
        "seed": sampling.seed,
        "grid_rows": "base model | adapter | export",
    }


def _write_report(report: ExportReport) -> Path:
    path = Path(report.path + ".report.json")
    text = json.dumps(dataclasses.asdict(report), indent=2)
    return write_text(path, text + "\n")
