"""A procedural image-caption world: 64×64 scenes of one or two objects, with captions.

The world exists so that small models can be pretrained and measured offline: every
scene is a pure function of its seed, the content (colour, shape, size, texture,
position, background) is known exactly, and the caption grammar is small enough that
every word is one token. Splits are disjoint seed ranges, so held-out scenes are never
seen in training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down, for clean anti-aliased edges

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "heart")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (35, 70, 220),
    "purple": (135, 55, 190),
    "pink": (245, 125, 190),
}

# Backgrounds are neutral so that "the colour of the object" is never ambiguous.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "beige": (225, 210, 170),
    "brown": (115, 75, 45),
}

# Radius ranges in pixels of the 64×64 image (the shape's nominal radius).
SIZES: dict[str, tuple[float, float]] = {"small": (7.0, 9.0), "large": (12.5, 14.5)}

TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
TEXTURE_SHADE = 0.55  # pattern colour = object colour × this: textures never change the hue

POSITIONS: dict[str, tuple[float, float]] = {
    "center": (32.0, 32.0),
    "left": (20.0, 32.0),
    "right": (44.0, 32.0),
    "top": (32.0, 20.0),
    "bottom": (32.0, 44.0),
}
POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "at the left",
    "right": "at the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
RELATIONS: tuple[str, ...] = ("left of", "above")

TWO_OBJECT_PROBABILITY = 0.5
POSITION_JITTER = 3.0
ROTATION_JITTER_DEGREES = 8.0
COLOR_JITTER = 12

# A word reserved for subject-driven fine-tuning: one token, never used by any caption.
RARE_IDENTIFIER = "sks"

_GRAMMAR_WORDS = ("a", "an", "and", "at", "the", "in", "on", "of", "background", "left", "right",
                  "top", "bottom", "center", "above")
WORLD_VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    [*_GRAMMAR_WORDS, *SHAPES, *COLORS, *BACKGROUNDS, *SIZES, *TEXTURES[1:], RARE_IDENTIFIER]
))

# Disjoint seed ranges: scene i of a split has seed start + i.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "heldout_a": (1_000_000_000, 1_100_000_000),
    "heldout_b": (1_100_000_000, 1_200_000_000),
    "subject": (1_200_000_000, 1_300_000_000),
    # the style domains' scenes (difftune.world.styles): training, held-out, and a second real set
    "style_train": (1_300_000_000, 1_310_000_000),
    "style_heldout": (1_310_000_000, 1_320_000_000),
    "style_reference": (1_320_000_000, 1_330_000_000),
}


@dataclass(frozen=True)
class WorldObject:
    """One drawn object: its named attributes and the exact numbers used to render it."""

    shape: str
    color: str
    size: str
    texture: str
    center: tuple[float, float]
    radius: float
    rotation: float  # degrees
    rgb: tuple[int, int, int]
    texture_phase: tuple[float, float]

    def phrase(self, keep_size: bool = True, keep_texture: bool = True) -> str:
        words = []
        if keep_size:
            words.append(self.size)
        words.append(self.color)
        if keep_texture and self.texture != "plain":
            words.append(self.texture)
        words.append(self.shape)
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])


@dataclass(frozen=True)
class Scene:
    """A full scene: one object at a named position, or two objects in a named relation."""

    seed: int
    objects: tuple[WorldObject, ...]
    background: str
    background_rgb: tuple[int, int, int]
    position: str | None = None  # one-object scenes
    relation: str | None = None  # two-object scenes: objects[0] is `relation` objects[1]

    def caption(self, rng: np.random.Generator | None = None, drop_probability: float = 0.0) -> str:
        """The scene's caption; with an rng, optional attributes are each dropped with a probability.

        Colour and shape (and, for pairs, the relation) are always kept, so every caption
        stays true of the scene; dropping teaches models the short prompts people type.
        """

        def keep() -> bool:
            return rng is None or rng.random() >= drop_probability

        parts = []
        if self.relation is None:
            parts.append(self.objects[0].phrase(keep(), keep()))
            if keep():
                parts.append(POSITION_PHRASES[self.position or "center"])
        else:
            first, second = self.objects
            parts += [first.phrase(keep(), keep()), self.relation, second.phrase(keep(), keep())]
        if keep():
            parts.append(f"on a {self.background} background")
        return " ".join(parts)


def split_seed(split: str, index: int) -> int:
    """Seed of scene ``index`` in a named split (clear error for unknown splits or overflow)."""
    if split not in SPLITS:
        raise ValueError(f"unknown world split '{split}'; known splits: {', '.join(SPLITS)}")
    start, end = SPLITS[split]
    if not 0 <= index < end - start:
        raise ValueError(f"scene index {index} is outside split '{split}' (size {end - start})")
    return start + index


def split_of_seed(seed: int) -> str:
    for name, (start, end) in SPLITS.items():
        if start <= seed < end:
            return name
    raise ValueError(f"seed {seed} belongs to no world split")


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    noise = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def _sample_object(rng: np.random.Generator, anchor: tuple[float, float], jitter: tuple[float, float],
                   color: str, size: str | None = None) -> WorldObject:
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = size or tuple(SIZES)[rng.integers(len(SIZES))]
    low, high = SIZES[size]
    center = (anchor[0] + rng.uniform(-jitter[0], jitter[0]), anchor[1] + rng.uniform(-jitter[1], jitter[1]))
    return WorldObject(
        shape=shape,
        color=color,
        size=size,
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        center=center,
        radius=float(rng.uniform(low, high)),
        rotation=float(rng.uniform(-ROTATION_JITTER_DEGREES, ROTATION_JITTER_DEGREES)),
        rgb=_jittered(COLORS[color], rng),
        texture_phase=(float(rng.uniform(0, 8)), float(rng.uniform(0, 8))),
    )


def sample_scene(seed: int) -> Scene:
    """The scene of a seed: a pure function, identical on every machine."""
    rng = np.random.default_rng(seed)
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    background_rgb = _jittered(BACKGROUNDS[background], rng)
    color_names = tuple(COLORS)
    if rng.random() >= TWO_OBJECT_PROBABILITY:
        position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        color = color_names[rng.integers(len(color_names))]
        obj = _sample_object(rng, POSITIONS[position], (POSITION_JITTER, POSITION_JITTER), color)
        return Scene(seed, (obj,), background, background_rgb, position=position)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    first_color, second_color = (color_names[i] for i in rng.choice(len(color_names), 2, replace=False))
    # Pairs sit in the two halves of the image; the cross axis gets more freedom.
    if relation == "left of":
        anchors, jitter = ((17.0, 32.0), (47.0, 32.0)), (1.0, 5.0)
    else:
        anchors, jitter = ((32.0, 17.0), (32.0, 47.0)), (5.0, 1.0)
    first = _sample_object(rng, anchors[0], jitter, first_color)
    second = _sample_object(rng, anchors[1], jitter, second_color)
    return Scene(seed, (first, second), background, background_rgb, relation=relation)


def world_scene(split: str, index: int) -> Scene:
    return sample_scene(split_seed(split, index))


def scenes_with_object(shape: str, color: str, count: int, split: str) -> list[Scene]:
    """The first ``count`` scenes of a split holding an object of this shape and colour: real
    images of a class (e.g. "red heart"), the reference a fine-tune's class images are scored against."""
    if shape not in SHAPES or color not in COLORS:
        raise ValueError(f"'{color} {shape}' is not a world class (colours: {', '.join(COLORS)}; "
                         f"shapes: {', '.join(SHAPES)})")
    start, end = SPLITS[split]
    found = []
    for index in range(end - start):
        scene = world_scene(split, index)
        if any(o.shape == shape and o.color == color for o in scene.objects):
            found.append(scene)
            if len(found) == count:
                return found
    raise ValueError(f"split '{split}' holds only {len(found)} scenes with a {color} {shape}, {count} asked")


# ---------------------------------------------------------------- rendering

def _unit_outline(shape: str) -> np.ndarray:
    """Polygon of a shape of nominal radius 1 centred at the origin, y pointing down."""
    if shape == "square":
        h = 0.85
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "diamond":
        r = 1.15
        return np.array([[0, -r], [r, 0], [0, r], [-r, 0]])
    if shape == "triangle":
        r = 1.2  # circumradius; centroid shifted down so the bounding box is centred
        angles = np.deg2rad([-90, 30, 150])
        return np.stack([r * np.cos(angles), r * np.sin(angles) + 0.25 * r], axis=1)
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.25, 0.52)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles) + 0.08], axis=1)
    if shape == "cross":
        a, w = 1.0, 0.36
        return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                         [-w, w], [-a, w], [-a, -w], [-w, -w]])
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], axis=1) / 15.0
    raise ValueError(f"unknown shape '{shape}'; known shapes: {', '.join(SHAPES)}")


def shape_mask(shape: str, center: tuple[float, float], radius: float, rotation: float,
               size: int = IMAGE_SIZE * SUPERSAMPLE) -> np.ndarray:
    """Binary mask (size × size) of a shape; coordinates are in 64-pixel image units."""
    scale = size / IMAGE_SIZE
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center[0] * scale, center[1] * scale
    if shape == "circle":
        r = radius * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        theta = math.radians(rotation)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        points = _unit_outline(shape) @ rot.T * radius * scale + np.array([cx, cy])
        draw.polygon([tuple(p) for p in points], fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


@lru_cache(maxsize=2)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) * (IMAGE_SIZE / size)
    return np.meshgrid(coords, coords, indexing="xy")


def texture_mask(texture: str, phase: tuple[float, float], size: int = IMAGE_SIZE * SUPERSAMPLE,
                 window: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
    """Where the darker pattern colour goes (bool), in 64-pixel units; ``window`` crops the grid."""
    x, y = _pixel_grid(size)
    x, y = x[window] + phase[0], y[window] + phase[1]
    if texture == "plain":
        return np.zeros(x.shape, dtype=bool)
    if texture == "striped":
        return ((x + y) % 6.0) < 3.0
    if texture == "dotted":
        return ((x % 6.0 - 3.0) ** 2 + (y % 6.0 - 3.0) ** 2) < 1.7**2
    if texture == "checkered":
        return ((np.floor(x / 4.0) + np.floor(y / 4.0)) % 2) == 0
    raise ValueError(f"unknown texture '{texture}'; known textures: {', '.join(TEXTURES)}")


def paint_object(canvas: np.ndarray, mask: np.ndarray, body_rgb: np.ndarray, pattern_rgb: np.ndarray,
                 pattern: np.ndarray) -> None:
    """Composite one object (body colour, pattern colour where ``pattern``) into a float canvas."""
    color = np.where(pattern[..., None], pattern_rgb, body_rgb)
    canvas *= 1.0 - mask[..., None]
    canvas += mask[..., None] * color


def downsample(canvas: np.ndarray) -> np.ndarray:
    """Box-filter a supersampled float canvas to a 64×64 uint8 image."""
    size = canvas.shape[0]
    factor = size // IMAGE_SIZE
    small = canvas.reshape(IMAGE_SIZE, factor, IMAGE_SIZE, factor, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as a 64×64×3 uint8 RGB array."""
    canvas = blank_canvas(scene.background_rgb)
    for obj in scene.objects:
        paint_world_object(canvas, obj)
    return downsample(canvas)


def blank_canvas(rgb: tuple[int, int, int], size: int = IMAGE_SIZE * SUPERSAMPLE) -> np.ndarray:
    """A supersampled float canvas filled with one colour."""
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.asarray(rgb, dtype=np.float32)
    return canvas


def paint_world_object(canvas: np.ndarray, obj: WorldObject) -> np.ndarray:
    """Paint one object as the world draws it (body colour, darker texture); returns its mask."""
    size = canvas.shape[0]
    mask = shape_mask(obj.shape, obj.center, obj.radius, obj.rotation, size)
    window = object_window(obj, size)
    body = np.asarray(obj.rgb, dtype=np.float32)
    pattern = texture_mask(obj.texture, obj.texture_phase, size, window)
    paint_object(canvas[window], mask[window], body, body * TEXTURE_SHADE, pattern)
    return mask


def object_window(obj: WorldObject, size: int) -> tuple[slice, slice]:
    """Rows and columns that can hold the object (every outline stays within 1.4 radii)."""
    scale = size / IMAGE_SIZE
    reach = 1.4 * obj.radius + 1.0

    def span(center: float) -> slice:
        return slice(max(int((center - reach) * scale), 0), min(math.ceil((center + reach) * scale), size))

    return span(obj.center[1]), span(obj.center[0])


def render_split(split: str, count: int, start: int = 0, progress: bool = False) -> np.ndarray:
    """``count`` scenes of a split as one uint8 array (count, 64, 64, 3)."""
    from tqdm.auto import tqdm

    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in tqdm(range(count), desc=f"render {split}", disable=not progress, unit="scene"):
        images[i] = render_scene(world_scene(split, start + i))
    return images


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1], the convention of the VAE and CLIP here."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] → uint8 (N, H, W, 3)."""
    array = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return array.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


class WorldDataset(torch.utils.data.Dataset):
    """The first ``length`` scenes of a split: ``{"pixel_values", "caption", "seed"}``.

    Images are rendered on demand (or taken from ``images``, a pre-rendered array of the
    same scenes). With ``caption_drop_probability`` > 0 the caption of item i is shortened
    by an rng seeded from (scene seed, ``caption_round``), so results stay reproducible.
    """

    def __init__(self, split: str, length: int, caption_drop_probability: float = 0.0,
                 images: np.ndarray | None = None, caption_round: int = 0) -> None:
        split_seed(split, max(length - 1, 0))  # validates split and length
        if images is not None and len(images) < length:
            raise ValueError(f"pre-rendered images hold {len(images)} scenes, fewer than length {length}")
        self.split = split
        self.length = length
        self.caption_drop_probability = caption_drop_probability
        self.images = images
        self.caption_round = caption_round

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = world_scene(self.split, index)
        image = self.images[index] if self.images is not None else render_scene(scene)
        rng = np.random.default_rng([scene.seed, self.caption_round])
        caption = scene.caption(rng, self.caption_drop_probability)
        return {"pixel_values": to_tensor(image[None])[0], "caption": caption, "seed": scene.seed}


def iterate_world(split: str, batch_size: int, start: int = 0,
                  caption_drop_probability: float = 0.0) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """An unlimited stream of (images in [-1, 1], captions) batches from consecutive scenes."""
    index = start
    while True:
        scenes = [world_scene(split, index + i) for i in range(batch_size)]
        images = np.stack([render_scene(s) for s in scenes])
        rng = np.random.default_rng(index)
        yield to_tensor(images), [s.caption(rng, caption_drop_probability) for s in scenes]
        index += batch_size
