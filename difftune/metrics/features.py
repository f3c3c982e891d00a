"""Image feature extractors for FID / KID / CLIP-I / DINO, usable with torchmetrics offline.

torchmetrics' ``FrechetInceptionDistance(feature=module)`` and
``KernelInceptionDistance(feature=module)`` accept any ``nn.Module`` that maps a batch of
images to (N, D) features and has an int ``num_features``; it hands the images over
unchanged. ``ClipImageFeatures`` wraps a transformers CLIP (or CLIP vision) model that
way, ``DinoImageFeatures`` a ViT / DINOv2 model (CLS token), so FID needs neither
torch-fidelity nor Inception weights. Both share one preprocessing path
(``ImageFeatures``): resize the shorter side, centre-crop, normalise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFeatures(nn.Module):
    """Shared base: image preprocessing and batched, gradient-free (N, D) float64 features.

    Accepts uint8 images in [0, 255] or float images in [0, 1], shaped (N, 3, H, W).
    The shorter side is resized to ``resize_to`` (bilinear, ``antialias``), the centre
    ``image_size`` square is cropped (a no-op for square inputs when both sizes agree),
    then the image is normalised with ``mean``/``std``. Subclasses implement ``encode``.
    ``normalize``: unit-length features (cosines), the form CLIP-I and DINO use; FID on
    unnormalised features keeps their spread.
    """

    num_features: int

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 resize_to: int | None = None, normalize: bool = False, batch_size: int = 256,
                 antialias: bool = True, name: str | None = None) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.resize_to = int(resize_to or image_size)
        if self.resize_to < self.image_size:
            raise ValueError(f"resize_to ({self.resize_to}) is smaller than the crop size {self.image_size}")
        self.normalize = normalize
        self.batch_size = batch_size
        self.antialias = antialias
        self.name = name or type(self).__name__
        for key, value in (("mean", mean), ("std", std)):
            values = torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(key, values, persistent=False)

    def describe_preprocessing(self) -> str:
        """How images are resized: recorded next to every FID computed with these features."""
        crop = f", centre crop {self.image_size}" if self.resize_to != self.image_size else ""
        aa = "antialiased" if self.antialias else "not antialiased"
        return f"shorter side to {self.resize_to} (bilinear, {aa}){crop}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images shaped (N, 3, H, W), got {tuple(images.shape)}")
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        height, width = pixels.shape[-2:]
        scale = self.resize_to / min(height, width)
        size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=self.antialias,
                                   align_corners=False)
        top = (size[0] - self.image_size) // 2
        left = (size[1] - self.image_size) // 2
        pixels = pixels[..., top:top + self.image_size, left:left + self.image_size]
        return (pixels - self.mean) / self.std

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size].to(self.mean.device)
            features = self.encode(self.preprocess(batch).to(self.model_dtype)).double()
            outputs.append(F.normalize(features, dim=-1) if self.normalize else features)
        return torch.cat(outputs)


class ClipImageFeatures(ImageFeatures):
    """CLIP image embeddings as an (N, D) feature extractor.

    ``projected``: the joint image-text embedding (``visual_projection``), else the
    vision tower's pooled output.
    """

    def __init__(self, model: nn.Module, image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 projected: bool = True, normalize: bool = False, batch_size: int = 256,
                 resize_to: int | None = None, antialias: bool = True, name: str | None = None) -> None:
        vision = getattr(model, "vision_model", None)
        if vision is None:
            raise TypeError(f"{type(model).__name__} has no vision_model; pass a CLIPModel or "
                            "CLIPVisionModel(WithProjection)")
        projection = getattr(model, "visual_projection", None)
        if projected and projection is None:
            raise TypeError(f"{type(model).__name__} has no visual_projection; use projected=False")
        config = vision.config
        super().__init__(image_size or config.image_size, mean, std, resize_to=resize_to,
                         normalize=normalize, batch_size=batch_size, antialias=antialias,
                         name=name or "clip")
        self.vision = vision.eval().requires_grad_(False)
        self.projection = projection.eval().requires_grad_(False) if projected else None
        self.num_features = int(projection.out_features if projected else config.hidden_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> ClipImageFeatures:
        """Load a CLIP model from a local folder or a hub id, with its image normalisation."""
        model, settings = load_clip_model(name_or_path, dtype)
        return cls(model, **{**settings, **kwargs})

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values=pixels).pooler_output
        return self.projection(features) if self.projection is not None else features


class DinoImageFeatures(ImageFeatures):
    """The CLS token of a ViT-style encoder (DINO ViT-S/16, DINOv2) as (N, D) features.

    The CLS token is taken from the final, layer-normalised hidden states
    (``last_hidden_state[:, 0]``), the embedding DreamBooth's DINO metric compares; a
    ViT pooler head (dense + tanh) is not used.
    """

    def __init__(self, model: nn.Module, image_size: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 normalize: bool = False, batch_size: int = 256, resize_to: int | None = None,
                 antialias: bool = True, name: str | None = None) -> None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "hidden_size") or not hasattr(config, "image_size"):
            raise TypeError(f"{type(model).__name__} is not a transformers ViT-style image model "
                            "(expected ViTModel or Dinov2Model)")
        super().__init__(image_size or config.image_size, mean, std, resize_to=resize_to,
                         normalize=normalize, batch_size=batch_size, antialias=antialias,
                         name=name or "dino")
        self.model = model.eval().requires_grad_(False)
        self.num_features = int(config.hidden_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> DinoImageFeatures:
        """Load a ViT / DINOv2 model (``AutoModel``) from a local folder or a hub id."""
        from transformers import AutoModel

        source = check_model_source(name_or_path, "DINO")
        with quiet_transformers():  # a ViT checkpoint without pooler weights warns; the pooler is unused
            model = AutoModel.from_pretrained(source, dtype=dtype)
        kwargs = {**processor_settings(source, IMAGENET_MEAN, IMAGENET_STD), **kwargs}
        kwargs.setdefault("name", f"dino:{name_or_path}")
        return cls(model, **kwargs)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


# ---------------------------------------------------------------- loading helpers

def load_clip_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:
    """A transformers ``CLIPModel`` and the image settings (mean, std, sizes, name) of its processor."""
    from transformers import CLIPModel

    source = check_model_source(name_or_path, "CLIP")
    model = CLIPModel.from_pretrained(source, dtype=dtype)
    return model, {**processor_settings(source, CLIP_MEAN, CLIP_STD), "name": f"clip:{name_or_path}"}


def check_model_source(name_or_path: str | Path, what: str) -> str:
    """A local folder must hold config.json; anything else not on disk is taken as a hub id."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no {what} model in {path} (expected config.json there)")
        return str(path)
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise FileNotFoundError(f"{what} model folder {name_or_path} does not exist")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(str(name_or_path), "config.json")
    if constants.HF_HUB_OFFLINE and not isinstance(cached, str):
        raise FileNotFoundError(f"{what} model {name_or_path} is a hub id, the hub is offline "
                                "(HF_HUB_OFFLINE) and the local cache has no copy: give a local model folder")
    return str(name_or_path)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning logs for one call (e.g. the torchvision fallback note)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def processor_settings(source: str, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """mean, std and resize size of a model's image processor; the defaults when it has none.

    Reads ``preprocessor_config.json`` or a processor's ``processor_config.json``
    (transformers 5 ``CLIPProcessor.save_pretrained`` writes only the latter).
    """
    from transformers import AutoImageProcessor

    try:
        with quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        return {"mean": tuple(mean), "std": tuple(std)}
    settings: dict[str, Any] = {
        "mean": tuple(getattr(processor, "image_mean", None) or mean),
        "std": tuple(getattr(processor, "image_std", None) or std),
    }
    crop = _size_value(getattr(processor, "crop_size", None), "height")
    resize = _size_value(getattr(processor, "size", None), "shortest_edge")
    do_crop = getattr(processor, "do_center_crop", False)
    if crop and do_crop:
        settings["image_size"] = crop
        if resize and resize >= crop:
            settings["resize_to"] = resize
    return settings


def _size_value(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


# ---------------------------------------------------------------- images in, features out

def to_uint8_tensor(image: Any) -> torch.Tensor:
    """One image (PIL, HWC uint8 array, or CHW tensor) as a (3, H, W) uint8 / float tensor."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor shaped (3, H, W), got {tuple(image.shape)}")
        return image
    array = image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image shaped (H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {array.dtype}")
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)  # PIL arrays are read-only


def image_batches(images: torch.Tensor | Iterable[Any], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of (B, 3, H, W) from a tensor or a sequence of images; sizes never mix in a batch."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images shaped (N, 3, H, W), got {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    pending: list[torch.Tensor] = []
    for image in images:
        tensor = to_uint8_tensor(image)
        if pending and (tensor.shape != pending[0].shape or len(pending) == batch_size
                        or tensor.dtype != pending[0].dtype):
            yield torch.stack(pending)
            pending = []
        pending.append(tensor)
    if pending:
        yield torch.stack(pending)


def extract_features(extractor: nn.Module, images: torch.Tensor | Iterable[Any], batch_size: int = 64,
                     desc: str | None = None) -> torch.Tensor:
    """(N, D) float64 features of images (tensor batch or a sequence of PIL / arrays / tensors)."""
    from tqdm.auto import tqdm

    total = len(images) if hasattr(images, "__len__") else None
    outputs = []
    with tqdm(total=total, desc=desc or "features", unit="img", disable=desc is None) as bar:
        for batch in image_batches(images, batch_size):
            with torch.no_grad():
                outputs.append(extractor(batch).double().cpu())
            bar.update(len(batch))
    if not outputs:
        raise ValueError("no images to extract features from")
    return torch.cat(outputs)
