"""CLIP score, CLIP-I, CLIP-T and DINO similarity from transformers models (hub id or folder).

Computed directly from a transformers ``CLIPModel`` (torchmetrics' ``CLIPScore`` breaks
under transformers 5 and refuses local folders). Conventions:

- CLIP score: 100 · max(cos(image, text), 0) per pair, averaged (torchmetrics' convention).
- CLIP-T: 100 · cos(image, prompt with the identifier replaced by the class name),
  averaged, not floored (DreamBooth's prompt-fidelity metric, scaled as SaRA reports it).
- CLIP-I and DINO: the mean cosine over all (generated, reference) pairs.

Cosines are taken in float64 from unit-normalised embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .features import ClipImageFeatures, DinoImageFeatures, extract_features, load_clip_model


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All cosines between rows of ``a`` (N, D) and rows of ``b`` (M, D), float64, (N, M)."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def mean_pairwise_cosine(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Average cosine over every (generated, reference) pair: CLIP-I and DINO."""
    return float(cosine_matrix(generated, reference).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``a`` with row i of ``b`` (N,), float64."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)


def neutral_prompt(prompt: str, identifier: str, class_name: str) -> str:
    """The prompt with the subject identifier replaced by the class name, for CLIP-T.

    "a sks dog on the beach" → "a dog on the beach"; an identifier used alone ("a sks on
    a table") becomes the class name ("a dog on a table"); an article left before a vowel
    is fixed ("a sks orange star" → "an orange star").
    """
    if not identifier:
        return prompt
    pattern = re.compile(rf"(?:\b([Aa]n?) )?\b{re.escape(identifier)}(?:\s+{re.escape(class_name)})?\b")

    def replace(match: re.Match) -> str:
        article = match.group(1)
        if article is None:
            return class_name
        vowel = class_name[:1].lower() in "aeiou"
        return f"{article[0]}{'n' if vowel else ''} {class_name}"

    return pattern.sub(replace, prompt)


class ClipSimilarity:
    """Text and image embeddings of one CLIP model; CLIP score, CLIP-I and CLIP-T from them."""

    def __init__(self, model: Any, tokenizer: Any, image_features: ClipImageFeatures | None = None,
                 batch_size: int = 64, name: str = "clip") -> None:
        if not hasattr(model, "text_model") or not hasattr(model, "text_projection"):
            raise TypeError(f"{type(model).__name__} is not a CLIPModel (no text_model / text_projection)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.images = image_features or ClipImageFeatures(model, batch_size=batch_size)
        self.images.normalize = True
        self.batch_size = batch_size
        self.name = name
        positions = int(model.config.text_config.max_position_embeddings)
        self.max_length = min(int(tokenizer.model_max_length), positions)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, batch_size: int = 64) -> ClipSimilarity:
        """Model, tokenizer and image normalisation from a local CLIP folder or a hub id."""
        from transformers import AutoTokenizer

        model, settings = load_clip_model(name_or_path, dtype)
        images = ClipImageFeatures(model, batch_size=batch_size, **settings)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        if len(tokenizer) <= 2:
            raise ValueError(f"the tokenizer of {name_or_path} has no vocabulary "
                             "(is the model present offline?)")
        scorer = cls(model, tokenizer, images, batch_size=batch_size, name=settings["name"])
        return scorer.to(device)

    def to(self, device: str | torch.device) -> ClipSimilarity:
        self.model.to(device)
        self.images.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_embeddings(self, images: torch.Tensor | Iterable[Any], desc: str | None = None) -> torch.Tensor:
        """Unit-length float64 image embeddings (N, D) of uint8 / [0, 1] images or PIL images."""
        return extract_features(self.images, images, self.batch_size, desc)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length float64 text embeddings (N, D); prompts are truncated to the model's length."""
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens.input_ids,
                                           attention_mask=tokens.attention_mask).pooler_output
            outputs.append(F.normalize(self.model.text_projection(pooled).double(), dim=-1).cpu())
        return torch.cat(outputs)

    def clip_score(self, images: torch.Tensor | Iterable[Any] | None, texts: Sequence[str],
                   floor: bool = True, image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pair 100 · cos(image_i, text_i), floored at 0 unless ``floor=False``."""
        if image_embeddings is None:
            image_embeddings = self.image_embeddings(images)
        if len(image_embeddings) != len(texts):
            raise ValueError(f"{len(image_embeddings)} images but {len(texts)} texts")
        scores = 100.0 * paired_cosine(image_embeddings, self.text_embeddings(texts))
        return scores.clamp(min=0) if floor else scores

    def clip_i(self, generated: Any, reference: Any) -> float:
        """Mean cosine over all (generated, reference) image pairs."""
        return mean_pairwise_cosine(self.image_embeddings(generated), self.image_embeddings(reference))

    def clip_t(self, images: Any, prompts: Sequence[str], identifier: str, class_name: str,
               image_embeddings: torch.Tensor | None = None) -> float:
        """Mean 100 · cos(image, prompt with the identifier replaced by the class name)."""
        texts = [neutral_prompt(p, identifier, class_name) for p in prompts]
        return float(self.clip_score(images, texts, floor=False, image_embeddings=image_embeddings).mean())


class DinoSimilarity:
    """DINO (ViT-S/16 or DINOv2) CLS embeddings; mean pairwise cosine between image sets."""

    def __init__(self, features: DinoImageFeatures, batch_size: int = 64) -> None:
        self.features = features
        self.features.normalize = True
        self.batch_size = batch_size
        self.name = features.name

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, batch_size: int = 64) -> DinoSimilarity:
        features = DinoImageFeatures.from_pretrained(name_or_path, dtype=dtype, batch_size=batch_size)
        return cls(features.to(device), batch_size=batch_size)

    def image_embeddings(self, images: torch.Tensor | Iterable[Any], desc: str | None = None) -> torch.Tensor:
        return extract_features(self.features, images, self.batch_size, desc)

    def dino(self, generated: Any, reference: Any) -> float:
        return mean_pairwise_cosine(self.image_embeddings(generated), self.image_embeddings(reference))

