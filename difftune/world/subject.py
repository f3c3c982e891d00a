"""The DreamBooth subject: a star with a pattern the world never draws.

World objects are one hue (textures only darken it). The subject is an orange star
carrying a smaller blue star inside it: two hues on one object, so a model can only
draw it after subject-driven fine-tuning. Its class, "star", is one of the world's
shapes, which makes prior preservation meaningful.

    python -m difftune.world.subject assets/subject    # re-render the shipped images
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import run_main
from .scenes import (
    BACKGROUNDS,
    IMAGE_SIZE,
    POSITIONS,
    RARE_IDENTIFIER,
    SIZES,
    SUPERSAMPLE,
    downsample,
    paint_object,
    shape_mask,
    split_seed,
)

CLASS_NAME = "star"
INSTANCE_PROMPT = f"a {RARE_IDENTIFIER} {CLASS_NAME}"
CLASS_PROMPT = f"a {CLASS_NAME}"
OUTER_RGB = (250, 140, 20)  # orange body
INNER_RGB = (35, 70, 220)  # a blue star inside it
INNER_SCALE = 0.5
DESCRIPTION = ("an orange star with a smaller blue star inside it: two hues on one object, "
               "which the world never draws")


def render_subject(center: tuple[float, float], radius: float, rotation: float,
                   background_rgb: tuple[int, int, int]) -> np.ndarray:
    """The subject on a plain background, as a 64×64×3 uint8 image."""
    size = IMAGE_SIZE * SUPERSAMPLE
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.asarray(background_rgb, dtype=np.float32)
    no_pattern = np.zeros((size, size), dtype=bool)
    for rgb, scale in ((OUTER_RGB, 1.0), (INNER_RGB, INNER_SCALE)):
        mask = shape_mask(CLASS_NAME, center, radius * scale, rotation, size)
        color = np.asarray(rgb, dtype=np.float32)
        paint_object(canvas, mask, color, color, no_pattern)
    return downsample(canvas)


def subject_views(count: int = 5) -> list[dict]:
    """Deterministic views: a different background and position each, always large."""
    if not 1 <= count <= len(BACKGROUNDS):
        raise ValueError(f"count must be between 1 and {len(BACKGROUNDS)}, got {count}")
    views = []
    for index in range(count):
        rng = np.random.default_rng(split_seed("subject", index))
        background = tuple(BACKGROUNDS)[index]
        position = tuple(POSITIONS)[index % len(POSITIONS)]
        anchor = POSITIONS[position]
        views.append({
            "background": background,
            "position": position,
            "center": (anchor[0] + rng.uniform(-2, 2), anchor[1] + rng.uniform(-2, 2)),
            "radius": float(rng.uniform(*SIZES["large"])),
            "rotation": float(rng.uniform(-8, 8)),
        })
    return views


def write_subject_assets(directory: str | Path, count: int = 5) -> dict:
    """Write ``count`` instance PNGs and ``subject.json`` into ``directory``; returns the json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = []
    for index, view in enumerate(subject_views(count)):
        background_rgb = BACKGROUNDS[view["background"]]
        image = render_subject(view["center"], view["radius"], view["rotation"], background_rgb)
        name = f"instance_{index:02d}.png"
        Image.fromarray(image).save(directory / name)
        images.append({"file": name, "background": view["background"], "position": view["position"]})
    info = {
        "instance_prompt": INSTANCE_PROMPT,
        "class_prompt": CLASS_PROMPT,
        "class_name": CLASS_NAME,
        "identifier": RARE_IDENTIFIER,
        "description": DESCRIPTION,
        "images": images,
        "rendered_by": "python -m difftune.world.subject <directory>",
    }
    (directory / "subject.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the DreamBooth subject images and subject.json.")
    parser.add_argument("directory", type=Path, help="output folder, e.g. assets/subject")
    parser.add_argument("--count", type=int, default=5, help=f"instance images, 1..{len(BACKGROUNDS)}")
    args = parser.parse_args(argv)
    info = write_subject_assets(args.directory, args.count)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    run_main(main)
