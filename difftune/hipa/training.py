"""One HiPA training step on the trainer's model families: batches from a teacher cache and the loss.

`OneStepData` turns stream positions into batches of (stored noise, teacher image,
prompt embeddings) with the trainer's reproducible shuffling (`SampleStream`), so a
resumed run sees exactly the batches of an uninterrupted one. `one_step_loss` runs the
student once from the noise at the last timestep, turns its output into x̂0 in closed
form, decodes x̂0 with the frozen VAE (gradients flow through the decoder into the
adapter) and compares the pixels with the teacher's sample under `HiPALoss`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..families import ModelFamily, NoisyInput, TrainingBatch
from ..streams import SampleStream
from .loss import HiPALoss
from .one_step import OneStepTimestep, decode_latents
from .teacher import TeacherCache


@dataclasses.dataclass
class OneStepBatch:
    noise: torch.Tensor  # (B, C, h, w) the stored initial noise, float32
    target: torch.Tensor  # (B, 3, H, W) the teacher's sample in [-1, 1], float32
    conditioning: TrainingBatch  # prompt embeddings and SDXL size conditions, for the family
    indices: list[int]  # cache indices, for logging and tests


class OneStepData:
    """Batches from a teacher cache; each distinct prompt is encoded once (frozen text encoders)."""

    def __init__(self, cache: TeacherCache, encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
                 seed: int, device: torch.device | str, indices: Sequence[int] | None = None):
        missing = cache.missing()
        if missing:
            raise ValueError(f"{cache.directory}: the teacher cache lacks {len(missing)} samples")
        self.cache = cache
        self.indices = list(range(len(cache))) if indices is None else list(indices)
        self.device = torch.device(device)
        self.stream = SampleStream(len(self.indices), seed)
        self.height, self.width = cache.manifest["height"], cache.manifest["width"]
        prompts = list(dict.fromkeys(cache.entries[i]["prompt"] for i in self.indices))
        with torch.no_grad():
            encoded = encode_prompts(prompts)
        self.prompt_cache = {p: {k: v[i:i + 1] for k, v in encoded.items()} for i, p in enumerate(prompts)}

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, positions: Sequence[int]) -> OneStepBatch:
        indices = [self.indices[self.stream.index(p)] for p in positions]
        samples = [self.cache[i] for i in indices]
        prompts = [s["prompt"] for s in samples]
        conditioning = {key: torch.cat([self.prompt_cache[p][key] for p in prompts]).to(self.device)
                        for key in self.prompt_cache[prompts[0]]}
        size = torch.tensor([[self.height, self.width]] * len(samples), device=self.device)
        training_batch = TrainingBatch(
            moments=torch.empty(0), conditioning=conditioning, original_sizes=size,
            crops_top_left=torch.zeros_like(size), is_prior=torch.zeros(len(samples), dtype=torch.bool),
            generators=[])
        return OneStepBatch(
            noise=torch.stack([s["noise"] for s in samples]).to(self.device),
            target=torch.stack([s["image"] for s in samples]).to(self.device),
            conditioning=training_batch, indices=indices)


def predict_x0_with_family(family: ModelFamily, model: nn.Module, step: OneStepTimestep,
                           batch: OneStepBatch) -> torch.Tensor:
    """x̂0 (latents) of the student from the batch's noise, in one call, with the family's conditioning."""
    noise = batch.noise
    timesteps = step.timestep.to(noise.device).expand(noise.shape[0])
    noisy = NoisyInput(model_input=noise, timesteps=timesteps, target=noise,
                       weights=torch.ones(noise.shape[0], device=noise.device))
    output = family.predict(model, noisy, batch.conditioning)
    return step.x0(output.float(), noise.float())


def one_step_loss(family: ModelFamily, model: nn.Module, step: OneStepTimestep, batch: OneStepBatch,
                  loss_fn: HiPALoss, vae: nn.Module | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``(loss, terms, decoded x̂0)`` of the student on one batch; differentiable through the decoder."""
    x0 = predict_x0_with_family(family, model, step, batch)
    pixels = decode_latents(vae if vae is not None else family.pipeline.vae, x0, type(family)).float()
    loss, terms = loss_fn(pixels, batch.target)
    return loss, terms, pixels
