"""Teacher targets for HiPA: the frozen base model's multi-step samples, cached on disk.

The paper's code is not public; our target for the one-step student is what the base
model itself draws with a full sampler (e.g. 25 steps with classifier-free guidance)
from the SAME initial noise and prompt. The student then learns to reach that sample
in one step. Generating targets is the expensive part, so it happens once:

* the noise of sample ``i`` is drawn from its own seed (``seed``, ``i``), so it does
  not depend on batching or on what was generated before, and is stored with it;
* each sample is one safetensors file (noise, final latent, decoded image) written
  atomically, plus a PNG to look at; a manifest records the settings and the list;
* a rerun skips finished files, so an interrupted generation continues where it
  stopped; a rerun with other settings is refused instead of mixing two teachers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..adapter_file import config_hash
from ..api import find_denoiser, has_adapter
from ..errors import DifftuneError
from ..families import family_of
from ..io import atomic_write, read_text, save_image, write_text
from ..options import option
from .one_step import decode_latents, from_pipeline_latents, latent_channels, to_pipeline_latents

MANIFEST_NAME = "manifest.json"
SAMPLES_DIR = "samples"
IMAGES_DIR = "images"
CACHE_FORMAT = 1
SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


@dataclasses.dataclass
class TeacherSettings:
    """How the base model draws the targets; all of it is recorded in the manifest."""

    num_inference_steps: int = option(25, "teacher sampling steps")
    guidance_scale: float = option(7.5, "teacher classifier-free guidance scale (1 = none)")
    scheduler: str = option("default", "teacher scheduler: default (the pipeline's own), an alias "
                            f"({', '.join(SCHEDULER_ALIASES)}) or a diffusers scheduler class name")
    negative_prompt: str = option("", "teacher negative prompt (used when guidance_scale > 1)")
    samples_per_prompt: int = option(1, "teacher samples (noise draws) per prompt")
    seed: int = option(0, "seed of the stored noise; sample i uses its own generator from (seed, i)")

    def validate(self) -> None:
        if self.num_inference_steps < 1:
            raise DifftuneError(f"teacher num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.samples_per_prompt < 1:
            raise DifftuneError(f"teacher samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if not 0 <= self.seed < 2**31:
            raise DifftuneError(f"teacher seed must be in [0, 2**31), got {self.seed}")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file, one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DifftuneError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in read_text(path, "prompt file").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DifftuneError(f"prompt file {path} holds no prompt (one prompt a line)")
    return prompts


def sample_noise(shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    """The initial noise of sample ``index``: its own generator, so order and batching do not matter."""
    generator = torch.Generator().manual_seed(seed * 2**32 + index)
    return torch.randn(tuple(shape), generator=generator)


def resolve_scheduler(pipe: Any, name: str) -> Any:
    """The teacher's scheduler: the pipeline's own, or another class built from its config."""
    if name == "default":
        return pipe.scheduler
    import diffusers

    class_name = SCHEDULER_ALIASES.get(name, name)
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise DifftuneError(f"--teacher_scheduler: unknown scheduler '{name}'. Use default, one of "
                            f"{', '.join(SCHEDULER_ALIASES)} or a diffusers scheduler class name")
    return scheduler_class.from_config(pipe.scheduler.config)


def _weights_checksum(model: torch.nn.Module) -> str:
    """A cheap identity of the weights (the first values of every tensor): two teachers differ."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            head = param.detach().flatten()[:16].double().cpu().numpy()
            digest.update(name.encode() + head.tobytes())
    return digest.hexdigest()[:16]


def _resolution(pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
    denoiser, _ = find_denoiser(pipe)
    family = family_of(pipe)
    default = family.native_resolution(denoiser.config, pipe.vae_scale_factor)
    height, width = height or default, width or default
    multiple = max(8, pipe.vae_scale_factor * family.latent_patch(denoiser.config))
    if height % multiple or width % multiple:
        raise DifftuneError(f"--resolution: {height}x{width} must be a multiple of {multiple} for this model")
    return height, width


class TeacherCache:
    """A finished or partial teacher cache on disk: ``cache[i]`` → noise, latents, image, prompt."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise DifftuneError(f"{self.directory}: not a teacher cache (no {MANIFEST_NAME})")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise DifftuneError(f"{manifest_path}: unknown teacher cache format "
                                f"{self.manifest.get('format')}")
        self.entries: list[dict[str, Any]] = self.manifest["entries"]

    def __len__(self) -> int:
        return len(self.entries)

    def sample_path(self, index: int) -> Path:
        return self.directory / SAMPLES_DIR / f"{index:06d}.safetensors"

    def image_path(self, index: int) -> Path:
        """The PNG of a sample (8-bit, converted from the full-precision decode)."""
        return self.directory / IMAGES_DIR / f"{index:06d}.png"

    def image(self, index: int) -> Image.Image:
        with Image.open(self.image_path(self.entries[index]["index"])) as picture:
            return picture.convert("RGB")

    def missing(self) -> list[int]:
        return [e["index"] for e in self.entries if not self.sample_path(e["index"]).is_file()]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        path = self.sample_path(entry["index"])
        if not path.is_file():
            raise DifftuneError(f"{self.directory}: teacher sample {index} is not generated yet; "
                                "rerun the generation to complete the cache")
        tensors = load_file(str(path))
        return {"noise": tensors["noise"], "latents": tensors["latents"],
                "image": tensors["image"].float(), "prompt": entry["prompt"],
                "prompt_index": entry["prompt_index"], "index": entry["index"]}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) images in [-1, 1] as PIL images, converted as diffusers pipelines do."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().postprocess(images.detach().float().cpu(), output_type="pil")


def _write_sample(cache: TeacherCache, index: int, noise: torch.Tensor, latents: torch.Tensor,
                  image: torch.Tensor) -> None:
    """One sample: the tensors (atomically) and a PNG of the image."""
    tensors = {"noise": noise.float(), "latents": latents.float(), "image": image.half()}
    picture = to_pil(image[None])[0]
    save_image(cache.image_path(index), picture)
    ready = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # the tensor file last: its presence means the sample is finished
    atomic_write(cache.sample_path(index), lambda tmp: save_file(ready, tmp))


def generate_teacher_samples(
    pipe: Any,
    prompts: Sequence[str],
    directory: str | os.PathLike,
    settings: TeacherSettings | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    model_name: str | None = None,
    show_progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
) -> TeacherCache:
    """Generate (or finish generating) the teacher samples of ``prompts`` into ``directory``.

    ``pipe`` is the frozen base pipeline, with no adapter attached. Returns the cache.
    With several processes, each calls this with its ``process_index`` and generates
    every ``num_processes``-th missing sample; the caller waits for all before reading.
    """
    settings = settings or TeacherSettings()
    settings.validate()
    prompts = list(prompts)
    if not prompts:
        raise DifftuneError("teacher generation: the prompt list is empty")
    if batch_size < 1:
        raise DifftuneError(f"teacher generation: batch size must be >= 1, got {batch_size}")
    if has_adapter(pipe):
        raise DifftuneError("teacher generation needs the frozen base model, but an adapter is attached")
    denoiser, _ = find_denoiser(pipe)
    height, width = _resolution(pipe, height, width)
    factor = pipe.vae_scale_factor
    latent_shape = [latent_channels(pipe, denoiser), height // factor, width // factor]
    scheduler = resolve_scheduler(pipe, settings.scheduler)

    n = settings.samples_per_prompt
    entries = [{"index": i * n + k, "prompt_index": i, "prompt": prompt}
               for i, prompt in enumerate(prompts) for k in range(n)]
    identity = {
        "format": CACHE_FORMAT,
        "model": model_name or getattr(denoiser.config, "_name_or_path", None) or "",
        "denoiser": {"class": type(denoiser).__name__, "config_hash": config_hash(denoiser),
                     "weights": _weights_checksum(denoiser)},
        "settings": dataclasses.asdict(settings),
        "scheduler_class": type(scheduler).__name__,
        "height": height,
        "width": width,
        "latent_shape": latent_shape,
        "entries": entries,
    }
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        changed = sorted(k for k in identity.keys() | existing.keys() if identity.get(k) != existing.get(k))
        if changed:
            raise DifftuneError(
                f"{directory}: a teacher cache made with other settings is there (differs in: "
                f"{', '.join(changed)}); use another --teacher_dir, or delete that one to regenerate")
    else:
        write_text(manifest_path, json.dumps(identity, indent=1))
    cache = TeacherCache(directory)

    missing = cache.missing()
    todo = missing[process_index::num_processes]
    progress = tqdm(total=len(entries), initial=len(entries) - len(missing), desc="teacher samples",
                    unit="sample", disable=not show_progress or process_index != 0)
    original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        for start in range(0, len(todo), batch_size):
            batch = [entries[i] for i in todo[start:start + batch_size]]
            noise = torch.stack([sample_noise(latent_shape, settings.seed, e["index"]) for e in batch])
            generators = [torch.Generator(pipe.device).manual_seed(settings.seed * 2**32 + e["index"])
                          for e in batch]
            with torch.no_grad():
                # no negative prompt where guidance is an embedding's value (Flux: sampled without CFG)
                family = family_of(pipe)
                guided = not family.embedded_guidance and settings.guidance_scale > 1
                negative = {"negative_prompt": [settings.negative_prompt] * len(batch)} if guided else {}
                guidance = ({"guidance_scale": settings.guidance_scale} if family.embedded_guidance
                            else family.guidance_kwargs(settings.guidance_scale))
                latents = pipe(
                    prompt=[e["prompt"] for e in batch],
                    **negative,
                    **guidance,
                    num_inference_steps=settings.num_inference_steps,
                    height=height, width=width,
                    latents=to_pipeline_latents(pipe, noise.to(pipe.device, denoiser.dtype)),
                    generator=generators,
                    output_type="latent",
                ).images
                latents = from_pipeline_latents(pipe, latents, height, width)
                images = decode_latents(pipe.vae, latents, family).clamp(-1, 1)
            for entry, z, x0, image in zip(batch, noise, latents, images, strict=True):
                _write_sample(cache, entry["index"], z, x0, image)
                progress.update(1)
    finally:
        pipe.scheduler = original_scheduler
        progress.close()
    return cache
