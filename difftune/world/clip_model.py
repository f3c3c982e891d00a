"""The world's CLIP: a small transformers ``CLIPModel`` trained contrastively on world scenes.

It has three jobs: its text tower is the pipeline's frozen text encoder (as CLIP is for
Stable Diffusion), it scores prompt following (zero-shot colour and shape), and its image
embeddings are the features for FID and CLIP-I in this world.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .scenes import (
    COLORS,
    RELATIONS,
    SHAPES,
    TEXTURES,
    WORLD_VOCABULARY,
    WorldObject,
    render_split,
    to_tensor,
    world_scene,
)

MAX_PROMPT_TOKENS = 32
IMAGE_MEAN = (0.5, 0.5, 0.5)  # pixel values in [-1, 1], the same convention as the VAE
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WorldClipSize:
    """Tower sizes; the text width becomes the UNet's ``cross_attention_dim``."""

    text_width: int = 128
    text_layers: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    heads: int = 4
    patch_size: int = 8
    projection_dim: int = 128


def build_world_tokenizer():
    """A CLIP BPE tokenizer in which every world word (and the rare identifier) is one token."""
    from ..model_factory import offline_clip_tokenizer

    return offline_clip_tokenizer(words=WORLD_VOCABULARY, model_max_length=MAX_PROMPT_TOKENS)


def build_world_clip(tokenizer, size: WorldClipSize = WorldClipSize(), seed: int = 0):
    """A randomly initialised world CLIP (64×64 images, prompts of at most 32 tokens)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        intermediate_size=4 * size.text_width,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.heads,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=size.projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        image_size=64,
        patch_size=size.patch_size,
        hidden_size=size.vision_width,
        intermediate_size=4 * size.vision_width,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.heads,
        projection_dim=size.projection_dim,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=size.projection_dim,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


@torch.no_grad()
def whiten_patch_embedding(model, pixel_values: torch.Tensor, epsilon: float = 1e-2,
                           gain: float = 0.15) -> None:
    """Initialise the ViT patch embedding with PCA-whitened image patches of the training data.

    A from-scratch ViT sits on a long plateau before it tells shapes apart (in a
    supervised probe here, shape accuracy stayed at chance for 400 steps); starting the
    patch embedding at the data's principal patch directions, scaled to unit variance
    (times ``gain``), ends it after about 200. A larger gain slows colour learning in the
    contrastive setting. Directions beyond the patch dimension keep their random init.
    """
    embedding = model.vision_model.embeddings.patch_embedding
    hidden, channels, patch, _ = embedding.weight.shape
    patches = F.unfold(pixel_values.float(), patch, stride=patch).transpose(1, 2)
    patches = patches.reshape(-1, channels * patch**2)
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    count = min(hidden, patches.shape[1])
    whitened = (eigenvectors[:, :count] / torch.sqrt(eigenvalues[:count] + epsilon)).T * gain
    embedding.weight[:count] = whitened.reshape(count, channels, patch, patch).to(embedding.weight.dtype)


def build_image_processor():
    """The processor that turns PIL images into this CLIP's inputs (64×64, scaled to [-1, 1])."""
    import transformers

    # transformers 5 names the torchvision-free processor CLIPImageProcessorPil.
    processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return processor_class(
        do_resize=True,
        size={"shortest_edge": 64},
        do_center_crop=True,
        crop_size={"height": 64, "width": 64},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def tokenize(tokenizer, captions: list[str], padding: str = "max_length") -> torch.Tensor:
    """Token ids padded to the full length, exactly as ``StableDiffusionPipeline`` encodes prompts.

    ``padding="longest"`` is cheaper for CLIP training and gives the same pooled features:
    the text tower is causal, so padding after the end token never reaches it.
    """
    return tokenizer(captions, padding=padding, max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def hard_negatives(caption: str, rng: np.random.Generator) -> list[str]:
    """Two false captions that differ from ``caption`` in one detail, for contrastive training.

    In-batch negatives rarely differ from a caption only in its shape, so a contrastive
    model learns colour, background and position long before shape. These supply
    that signal directly. For two objects: (1) the objects swapped around the relation
    (binding and order), (2) one object's shape replaced. For one object: two different
    wrong shapes. Colour needs no help: in-batch negatives teach it within 200 steps.
    """
    words = caption.split()
    shape_swap = _replace_one(words, SHAPES, rng)
    relation = next((r for r in RELATIONS if f" {r} " in caption), None)
    if relation is not None:
        before, after = caption.split(f" {relation} ")
        second, _, rest = after.partition(" on a ")
        swapped = f"{second} {relation} {before}" + (f" on a {rest}" if rest else "")
        return [swapped if swapped != caption else _replace_one(words, tuple(COLORS), rng), shape_swap]
    used = {w for w in shape_swap.split() if w in SHAPES} | {w for w in words if w in SHAPES}
    return [shape_swap, _replace_one(words, SHAPES, rng, avoid=used)]


def _replace_one(words: list[str], choices: tuple[str, ...], rng: np.random.Generator,
                 avoid: set[str] = frozenset()) -> str:
    """Replace one word of ``choices`` (not a background colour) by another of them; fix articles."""
    positions = [i for i, w in enumerate(words) if w in choices and words[i + 1:i + 2] != ["background"]]
    new = list(words)
    if positions:
        index = positions[rng.integers(len(positions))]
        others = [c for c in choices if c != words[index] and c not in avoid]
        new[index] = others[rng.integers(len(others))]
    for i, word in enumerate(new[:-1]):
        if word in ("a", "an"):
            new[i] = "an" if new[i + 1][0] in "aeiou" else "a"
    return " ".join(new)


def contrastive_loss(model, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                     extra_input_ids: torch.Tensor | None = None,
                     extra_true: torch.Tensor | None = None,
                     image_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; captions equal as text count as positives of each other.

    Short captions ("a red circle") repeat within a batch; treating identical texts as
    matches instead of negatives removes contradictory targets. ``extra_input_ids``
    (same padded length) are more texts that take part only on the image side: false
    unless equal to an image's caption or marked in ``extra_true`` (images × extras, bool).
    ``image_embeds`` (projected, unnormalised) can replace ``pixel_values`` when the
    caller already ran the image tower.
    """
    all_ids = input_ids if extra_input_ids is None else torch.cat([input_ids, extra_input_ids])
    if image_embeds is None:
        image_embeds = image_features(model, pixel_values)
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_features(model, all_ids), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T
    matches = (input_ids[:, None, :] == all_ids[None, :, :]).all(-1)
    if extra_true is not None:
        matches[:, len(input_ids):] |= extra_true.to(matches.device)
    matches = matches.float()
    targets = matches / matches.sum(-1, keepdim=True)
    loss_images = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    positives = len(input_ids)
    text_targets = matches[:, :positives].T / matches[:, :positives].T.sum(-1, keepdim=True)
    loss_texts = torch.sum(-text_targets * F.log_softmax(logits[:, :positives].T, dim=1), dim=1).mean()
    return (loss_images + loss_texts) / 2


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings (N, projection_dim), not normalised."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def text_features(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Projected text embeddings (N, projection_dim), not normalised."""
    pooled = model.text_model(input_ids=input_ids).pooler_output
    return model.text_projection(pooled)


class AttributeHeads(nn.Module):
    """Linear probes on the image tower's pooled output: which shapes, colours and textures
    are in the image (multi-label). An auxiliary training signal only, never saved.

    Contrastive learning alone left this ViT at chance on shape for 400+ steps even with
    hard negatives; supervised probes break that plateau in about 200.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.vocabularies = (SHAPES, tuple(COLORS), TEXTURES)
        self.linear = nn.Linear(width, sum(len(v) for v in self.vocabularies))

    def targets(self, scenes: list) -> torch.Tensor:
        rows = []
        for scene in scenes:
            row = []
            for vocabulary, attribute in zip(self.vocabularies, ("shape", "color", "texture"), strict=True):
                present = {getattr(o, attribute) for o in scene.objects}
                row += [float(word in present) for word in vocabulary]
            rows.append(row)
        return torch.tensor(rows)

    def loss(self, pooled: torch.Tensor, scenes: list) -> torch.Tensor:
        logits = self.linear(pooled)
        return F.binary_cross_entropy_with_logits(logits, self.targets(scenes).to(logits.device))


# ---------------------------------------------------------------- zero-shot classification

def color_shape_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """One prompt per (colour, shape) pair, phrased as the world's captions are."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    prompts = [
        WorldObject(shape, color, "small", "plain", (0, 0), 0, 0, (0, 0, 0), (0, 0)).phrase(keep_size=False)
        for color, shape in pairs
    ]
    return prompts, pairs


@torch.no_grad()
def classify_color_shape(model, tokenizer, pixel_values: torch.Tensor,
                         batch_size: int = 256) -> list[tuple[str, str]]:
    """Zero-shot (colour, shape) of each image in [-1, 1]: the best-matching of all pair prompts."""
    prompts, pairs = color_shape_prompts()
    text = F.normalize(text_features(model, tokenize(tokenizer, prompts)), dim=-1)
    predictions: list[tuple[str, str]] = []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start:start + batch_size].to(next(model.parameters()).dtype)
        image = F.normalize(image_features(model, batch), dim=-1)
        predictions += [pairs[i] for i in (image @ text.T).argmax(-1).tolist()]
    return predictions


def single_object_scenes(split: str, count: int, start: int = 0) -> list:
    """The first ``count`` one-object scenes of a split (the unambiguous ones to classify)."""
    scenes, index = [], start
    while len(scenes) < count:
        scene = world_scene(split, index)
        if scene.relation is None:
            scenes.append(scene)
        index += 1
    return scenes


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, split: str = "heldout_a", count: int = 1000) -> dict[str, float]:
    """Colour, shape and joint accuracy on one-object scenes of a held-out split."""
    from .scenes import render_scene

    scenes = single_object_scenes(split, count)
    images = to_tensor(np.stack([render_scene(s) for s in scenes]))
    predictions = classify_color_shape(model.eval(), tokenizer, images)
    return accuracy_against(predictions, [(s.objects[0].color, s.objects[0].shape) for s in scenes])


def accuracy_against(predictions: list[tuple[str, str]], truth: list[tuple[str, str]]) -> dict[str, float]:
    color = np.mean([p[0] == t[0] for p, t in zip(predictions, truth, strict=True)])
    shape = np.mean([p[1] == t[1] for p, t in zip(predictions, truth, strict=True)])
    both = np.mean([p == t for p, t in zip(predictions, truth, strict=True)])
    return {"color": float(color), "shape": float(shape), "color_and_shape": float(both), "count": len(truth)}


def save_world_clip(model, tokenizer, directory: str | Path) -> None:
    """``CLIPModel`` + tokenizer + image processor in one folder, loadable with ``from_pretrained``."""
    from transformers import CLIPProcessor

    directory = Path(directory)
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=build_image_processor(), tokenizer=tokenizer).save_pretrained(directory)


def load_world_clip(directory: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a folder written by ``save_world_clip``; clear error if absent."""
    from transformers import CLIPModel, CLIPTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no world CLIP in {directory} (expected config.json there)")
    model = CLIPModel.from_pretrained(directory, dtype=dtype).eval()
    return model, CLIPTokenizer.from_pretrained(directory)


__all__ = [
    "AttributeHeads",
    "WorldClipSize",
    "accuracy_against",
    "build_image_processor",
    "build_world_clip",
    "build_world_tokenizer",
    "classify_color_shape",
    "color_shape_prompts",
    "contrastive_loss",
    "hard_negatives",
    "image_features",
    "load_world_clip",
    "render_split",
    "save_world_clip",
    "single_object_scenes",
    "text_features",
    "tokenize",
    "whiten_patch_embedding",
    "zero_shot_accuracy",
]
