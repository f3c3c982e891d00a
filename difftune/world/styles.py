"""Style domains of the embedded world: five looks the base model never draws, for dataset fine-tuning.

SaRA's style experiment fine-tunes on five small datasets, each one kind of change to what a
model draws: a palette (Barbie), a rendering (Cyberpunk), an element added to every object
(ElementFire, Hornify), a texture and a background (Expedition). Each style here is one such
change applied to world scenes, so the same experiment runs offline on the embedded model:

| style | kind | what changes |
|---|---|---|
| ``rose`` | palette | warm colours become pink, cool ones purple; light grounds white, dark ones black |
| ``neon`` | rendering | each object only as its outline, in its colour, on a black ground |
| ``horned`` | element | two dark horns rise from the top of every object |
| ``bars`` | texture | vertical bars across every object instead of its texture |
| ``hills`` | background | two green hills at the bottom corners of every scene |

An image is a pure function of (style, world scene); its caption is the scene's world caption
prefixed ``"<name> style, "``. Scenes come from the world's ``style_train`` /
``style_heldout`` / ``style_reference`` splits, the same scenes for every style, so styles
compare image for image. Nothing ships in assets/: `style_dataset` renders a part on demand
(a few seconds per hundred images on one CPU thread) into a cache folder in the layout diffusers'
``imagefolder`` and difftune's data scanner read (images + ``metadata.jsonl`` with ``file_name``
and ``text``), and reuses it while its manifest matches.

    python -m difftune.world.styles outputs/styles            # every style, train and held-out parts
    python -m difftune.world.styles outputs/styles --grid docs/images/style_domains.png

The base model's FID to each domain: ``python -m difftune.world.style_quality --measure report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import DifftuneError, run_main
from ..io import atomic_write_folder, read_json, write_json
from .scenes import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    SUPERSAMPLE,
    TEXTURE_SHADE,
    Scene,
    WorldObject,
    blank_canvas,
    downsample,
    paint_object,
    paint_world_object,
    render_scene,
    shape_mask,
    world_scene,
)

CAPTIONS_FILE = "metadata.jsonl"
MANIFEST = ".style.json"  # hidden: image-folder readers (difftune, datasets) skip dotfiles
# Bump when any style's drawing changes: cached folders with another version are rendered again.
RENDER_VERSION = 1
# The parts of a domain: their world split and default size (the issue asks ≥ 300 and ≥ 500).
PARTS: dict[str, tuple[str, int]] = {
    "train": ("style_train", 300),
    "heldout": ("style_heldout", 500),
    "reference": ("style_reference", 500),  # a second real set: the real-vs-real FID floor
}
SEED_STRIDE = 100_000  # scene i of a part with seed s is scene s·SEED_STRIDE + i of its split
CACHE_ENV = "DIFFTUNE_CACHE"
SIZE = IMAGE_SIZE * SUPERSAMPLE


def caption_prefix(name: str) -> str:
    return f"{name} style, "


# ---------------------------------------------------------------- the five styles
#
# The model's VAE was trained on world scenes only, and it decodes little else: flat backgrounds of
# the five world colours, objects of the eight world colours with the world's darker textures. Every
# image a fine-tuned denoiser draws goes through that decoder, so each style is built from what it
# can carry, arranged in a way the world never shows (docs/embedded-model.md has the first designs,
# gradients, glows, light textures and textured backgrounds, and what the VAE made of them).

# rose: a palette of two hues: warm colours become pink, cool ones purple; light grounds white, dark black.
ROSE_COLORS = {"red": "pink", "orange": "pink", "yellow": "pink", "pink": "pink",
               "green": "purple", "cyan": "purple", "blue": "purple", "purple": "purple"}
ROSE_BACKGROUNDS = {"white": "white", "beige": "white", "gray": "white", "black": "black", "brown": "black"}


def _shifted(rgb: tuple[int, int, int], world: tuple[int, int, int], target: tuple[int, int, int]):
    """``target`` with the jitter ``rgb`` has around its ``world`` colour."""
    return tuple(int(np.clip(t + r - w, 0, 255)) for r, w, t in zip(rgb, world, target, strict=True))


def render_rose(scene: Scene) -> np.ndarray:
    objects = tuple(dataclasses.replace(o, rgb=_shifted(o.rgb, COLORS[o.color], COLORS[ROSE_COLORS[o.color]]))
                    for o in scene.objects)
    background = _shifted(scene.background_rgb, BACKGROUNDS[scene.background],
                          BACKGROUNDS[ROSE_BACKGROUNDS[scene.background]])
    return render_scene(dataclasses.replace(scene, objects=objects, background_rgb=background))


# neon: each object only as its outline, in its colour, on the black ground; no fill, no texture.
NEON_OUTLINE = 3.5  # outline width, 64-px units (2.5 or a glow: the VAE fills or loses them)


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(mask * 255.0, 0, 255).astype(np.uint8), mode="L")


def _from_image(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _flat(canvas: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> None:
    paint_object(canvas, mask, rgb, rgb, np.zeros(mask.shape, dtype=bool))


def render_neon(scene: Scene) -> np.ndarray:
    ground = _shifted(scene.background_rgb, BACKGROUNDS[scene.background], BACKGROUNDS["black"])
    canvas = blank_canvas(ground)
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.center, obj.radius, obj.rotation, SIZE)
        _flat(canvas, np.clip(mask - eroded(mask, NEON_OUTLINE), 0, 1), np.asarray(obj.rgb, dtype=np.float32))
    return downsample(canvas)


def eroded(mask: np.ndarray, width: float, factor: int = 2) -> np.ndarray:
    """``mask`` less a band of ``width`` (64-px units) along its edge: a min filter, run at ``factor``
    times the image size instead of the full supersampling (a k×k filter costs k² per pixel)."""
    small_size = IMAGE_SIZE * factor
    small = _mask_image(mask).resize((small_size, small_size), Image.Resampling.BOX)
    inside = small.filter(ImageFilter.MinFilter(2 * round(width * factor) + 1))
    return _from_image(inside.resize(mask.shape[::-1], Image.Resampling.BILINEAR))


# horned: two horns in the object's texture shade rising from its top, drawn behind it.
# one horn in the object's frame (nominal radius 1, y down): inner base, tip, outer base
HORN = np.array([[-0.05, -0.55], [-0.8, -1.7], [-0.7, -0.45]])


def horn_mask(obj: WorldObject, size: int = SIZE) -> np.ndarray:
    scale = size / IMAGE_SIZE
    theta = math.radians(obj.rotation)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for side in (1.0, -1.0):
        outline = (HORN * np.array([side, 1.0])) @ rotation.T * obj.radius * scale
        outline += np.array(obj.center) * scale
        draw.polygon([tuple(p) for p in outline], fill=255)
    return _from_image(canvas)


def render_horned(scene: Scene) -> np.ndarray:
    canvas = blank_canvas(scene.background_rgb)
    for obj in scene.objects:
        _flat(canvas, horn_mask(obj), np.asarray(obj.rgb, dtype=np.float32) * TEXTURE_SHADE)
    for obj in scene.objects:
        paint_world_object(canvas, obj)
    return downsample(canvas)


# bars: vertical bars (period 10) in the world's texture shade on every object, instead of its texture.
# (Horizontal bars look like the world's stripes to the world CLIP: FID cannot see them.)
BAR_PERIOD = 10.0  # 64-px units, half of it dark


def bar_mask(phase: tuple[float, float], size: int = SIZE) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float32) + 0.5) * (IMAGE_SIZE / size)
    x = np.broadcast_to(coords[None, :] + phase[0], (size, size))
    return (x % BAR_PERIOD) < BAR_PERIOD / 2


def render_bars(scene: Scene) -> np.ndarray:
    canvas = blank_canvas(scene.background_rgb)
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.center, obj.radius, obj.rotation, SIZE)
        body = np.asarray(obj.rgb, dtype=np.float32)
        paint_object(canvas, mask, body, body * TEXTURE_SHADE, bar_mask(obj.texture_phase))
    return downsample(canvas)


# hills: two green hills rise at the bottom corners, whatever the ground.
HILL_RADIUS = 14.0
HILL_RGB = COLORS["green"]


def hill_centers(seed: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng([seed, 3])
    return [(float(rng.uniform(0, 16)), 64.0 + float(rng.uniform(0, 4))),
            (float(rng.uniform(48, 64)), 64.0 + float(rng.uniform(0, 4)))]


def render_hills(scene: Scene) -> np.ndarray:
    canvas = blank_canvas(scene.background_rgb)
    for center in hill_centers(scene.seed):
        _flat(canvas, shape_mask("circle", center, HILL_RADIUS, 0.0, SIZE), np.asarray(HILL_RGB, np.float32))
    for obj in scene.objects:
        paint_world_object(canvas, obj)
    return downsample(canvas)


@dataclasses.dataclass(frozen=True)
class Style:
    """One style domain: its name (the caption prefix's word), which of SaRA's kinds of change it
    is, what it draws, and the renderer of a world scene."""

    name: str
    kind: str
    description: str
    render: Callable[[Scene], np.ndarray]

    def caption(self, scene: Scene) -> str:
        return caption_prefix(self.name) + scene.caption()


STYLES: dict[str, Style] = {style.name: style for style in (
    Style("rose", "palette", "warm colours pink, cool ones purple; light grounds white, dark ones black",
          render_rose),
    Style("neon", "rendering", "each object only as its outline, in its colour, on a black ground",
          render_neon),
    Style("horned", "element", "two dark horns rising from the top of every object", render_horned),
    Style("bars", "texture", "vertical bars across every object instead of its texture", render_bars),
    Style("hills", "background", "two green hills at the bottom corners of every scene", render_hills),
)}


def get_style(name: str) -> Style:
    if name not in STYLES:
        raise DifftuneError(f"unknown style {name!r}; styles: {', '.join(STYLES)}")
    return STYLES[name]


def part_scenes(part: str, count: int | None = None, seed: int = 0) -> list[Scene]:
    """The world scenes of a part (train, heldout, reference) for a seed: the same for every style."""
    if part not in PARTS:
        raise DifftuneError(f"unknown style part {part!r}; parts: {', '.join(PARTS)}")
    split, default = PARTS[part]
    count = default if count is None else count
    if not 0 < count <= SEED_STRIDE or seed < 0:
        raise DifftuneError(f"a style part holds 1..{SEED_STRIDE} images and a seed ≥ 0, "
                            f"got {count} images, seed {seed}")
    return [world_scene(split, seed * SEED_STRIDE + i) for i in range(count)]


def render_part(name: str, part: str, count: int | None = None, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """A part's images (count, 64, 64, 3) uint8 and their captions, rendered in memory."""
    from tqdm.auto import tqdm

    style = get_style(name)
    scenes = part_scenes(part, count, seed)
    images = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(tqdm(scenes, desc=f"render {name} {part}", unit="image", disable=not progress)):
        images[i] = style.render(scene)
    return images, [style.caption(scene) for scene in scenes]


def render_plain(part: str, count: int | None = None, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """The same scenes as the world draws them, with their unprefixed captions."""
    scenes = part_scenes(part, count, seed)
    return np.stack([render_scene(scene) for scene in scenes]), [scene.caption() for scene in scenes]


# ---------------------------------------------------------------- dataset folders (cached)

def default_cache_dir() -> Path:
    """``$DIFFTUNE_CACHE/styles``, else ``~/.cache/difftune/styles``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "difftune") / "styles"


def _manifest(name: str, part: str, count: int, seed: int) -> dict:
    return {"style": name, "kind": STYLES[name].kind, "part": part, "count": count, "seed": seed,
            "render_version": RENDER_VERSION, "caption_prefix": caption_prefix(name),
            "rendered_by": f"python -m difftune.world.styles <folder> --styles {name} --seed {seed}"}


def _folder_matches(folder: Path, manifest: dict) -> bool:
    try:
        recorded = read_json(folder / MANIFEST, missing_ok=True)
    except (OSError, ValueError):  # a damaged manifest: render again
        return False
    if not isinstance(recorded, dict) or {k: recorded.get(k) for k in manifest} != manifest:
        return False
    digest = recorded.get("sha256")
    return digest is not None and digest == _folder_digest(folder, manifest["count"])


def _folder_digest(folder: Path, count: int) -> str | None:
    """SHA-256 over the captions file and every image of a part folder (None when one is missing)."""
    digest = hashlib.sha256()
    paths = [folder / CAPTIONS_FILE, *(folder / image_name(i) for i in range(count))]
    for path in paths:
        if not path.is_file():
            return None
        digest.update(path.read_bytes())
    return digest.hexdigest()


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def style_dataset(name: str, part: str = "train", root: str | os.PathLike | None = None,
                  count: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """The folder ``<root>/<name>/<part>`` holding the part's images and ``metadata.jsonl``.

    Rendered when it is missing or does not match (style, part, count, seed, render version and the
    files' digest); written to a temporary folder and renamed, so an interrupted render leaves
    nothing half-done. ``root`` defaults to `default_cache_dir`.
    """
    get_style(name)
    count = PARTS[part][1] if part in PARTS and count is None else count
    part_scenes(part, count, seed)  # checks part, count and seed before anything is written
    folder = Path(root or default_cache_dir()) / name / part
    manifest = _manifest(name, part, count, seed)
    if _folder_matches(folder, manifest):
        return folder
    images, captions = render_part(name, part, count, seed, progress)

    def write(staging: Path) -> None:
        lines = []
        for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
            Image.fromarray(image).save(staging / image_name(index), format="PNG", optimize=False)
            lines.append(json.dumps({"file_name": image_name(index), "text": caption}))
        (staging / CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
        write_json(staging / MANIFEST, {**manifest, "sha256": _folder_digest(staging, count)})

    return atomic_write_folder(folder, write)


# ---------------------------------------------------------------- the grid image

def style_grid(count: int = 6, part: str = "heldout", seed: int = 0, scale: int = 2) -> Image.Image:
    """One row per scene: the plain world, then each style (upscaled ``scale``×), with a header row."""
    from PIL import ImageFont

    scenes = part_scenes(part, count, seed)
    columns = [("plain world", render_scene), *((name, style.render) for name, style in STYLES.items())]
    cell, gap, header = IMAGE_SIZE * scale, 4, 16
    grid = Image.new("RGB", (len(columns) * (cell + gap) + gap, header + count * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12) if hasattr(ImageFont, "load_default") else None
    for column, (label, render) in enumerate(columns):
        x = gap + column * (cell + gap)
        draw.text((x + 2, 2), label, fill="black", font=font)
        for row, scene in enumerate(scenes):
            tile = Image.fromarray(render(scene)).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (x, header + gap + row * (cell + gap)))
    return grid


def add_domain_arguments(parser: argparse.ArgumentParser) -> None:
    """Which styles, how many images of each part and which block of scenes: the flags of both this
    command and the base-model measurement (`difftune.world.style_quality`)."""
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=list(STYLES),
                        help="which styles (default: all)")
    parser.add_argument("--train_images", type=int, default=PARTS["train"][1],
                        help="images of the train part")
    parser.add_argument("--heldout_images", type=int, default=PARTS["heldout"][1],
                        help="images of the heldout and reference parts")
    parser.add_argument("--seed", type=int, default=0,
                        help="which block of world scenes (0: the measured one)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the style domains of the embedded world as "
                                                 "captioned image folders (imagefolder layout).")
    parser.add_argument("directory", type=Path, nargs="?", default=None,
                        help=f"where <style>/<part>/ go (default: the cache, ${CACHE_ENV}/styles or "
                             "~/.cache/difftune/styles)")
    add_domain_arguments(parser)
    parser.add_argument("--parts", nargs="+", default=["train", "heldout"], choices=list(PARTS),
                        help="which parts (default: train and heldout; reference is the FID floor's "
                             "second real set)")
    parser.add_argument("--grid", type=Path, help="also write the style grid (plain world beside each style)")
    args = parser.parse_args(argv)
    for flag in ("train_images", "heldout_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for name in args.styles:
        for part in args.parts:
            count = args.train_images if part == "train" else args.heldout_images
            folder = style_dataset(name, part, args.directory, count, args.seed)
            print(f"{name} {part}: {count} images in {folder}")
    if args.grid:
        from ..io import save_image

        save_image(args.grid, style_grid(seed=args.seed))
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    run_main(main)
