"""Image feature extractors for FID / KID / CLIP-I, usable with torchmetrics offline.

torchmetrics' ``FrechetInceptionDistance(feature=module)`` and
``KernelInceptionDistance(feature=module)`` accept any ``nn.Module`` that maps a batch of
images to (N, D) features and has an int ``num_features``; it hands the images over
unchanged. ``ClipImageFeatures`` wraps a transformers CLIP (or CLIP vision) model that
way, so FID needs neither torch-fidelity nor Inception weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings as an (N, D) feature extractor.

    Accepts uint8 images in [0, 255] or float images in [0, 1], shaped (N, 3, H, W);
    resizes them to the model's input size, normalises with the model's mean/std and
    returns float64 features (the dtype torchmetrics accumulates in).

    ``projected``: the joint image-text embedding (``visual_projection``), else the
    vision tower's pooled output. ``normalize``: unit-length features (cosines), the form
    CLIP-I uses; FID on unnormalised features keeps their spread.
    """

    def __init__(self, model: nn.Module, image_size: int | None = None,
                 mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
                 projected: bool = True, normalize: bool = False, batch_size: int = 256) -> None:
        super().__init__()
        vision = getattr(model, "vision_model", None)
        if vision is None:
            raise TypeError(f"{type(model).__name__} has no vision_model; pass a CLIPModel or "
                            "CLIPVisionModel(WithProjection)")
        projection = getattr(model, "visual_projection", None)
        if projected and projection is None:
            raise TypeError(f"{type(model).__name__} has no visual_projection; use projected=False")
        self.vision = vision.eval().requires_grad_(False)
        self.projection = projection.eval().requires_grad_(False) if projected else None
        config = vision.config
        self.image_size = int(image_size or config.image_size)
        self.num_features = int(projection.out_features if projected else config.hidden_size)
        self.normalize = normalize
        self.batch_size = batch_size
        for name, values in (("mean", mean), ("std", std)):
            tensor = torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(name, tensor, persistent=False)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> ClipImageFeatures:
        """Load a local CLIP folder (model + ``preprocessor_config.json``), offline."""
        import json

        from transformers import CLIPModel

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model in {directory} (expected config.json there)")
        processor_file = directory / "preprocessor_config.json"
        if processor_file.is_file() and not {"mean", "std"} & kwargs.keys():
            processor = json.loads(processor_file.read_text())
            kwargs.setdefault("mean", processor.get("image_mean"))
            kwargs.setdefault("std", processor.get("image_std"))
        model = CLIPModel.from_pretrained(directory, torch_dtype=torch.float32)
        return cls(model, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images shaped (N, 3, H, W), got {tuple(images.shape)}")
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vision.parameters()).dtype
        outputs = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start:start + self.batch_size]).to(dtype)
            features = self.vision(pixel_values=pixels).pooler_output
            if self.projection is not None:
                features = self.projection(features)
            if self.normalize:
                features = F.normalize(features.float(), dim=-1)
            outputs.append(features.double())
        return torch.cat(outputs)
