"""DreamBooth subjects for the embedded world model: objects the world never draws.

World objects are one hue of one of seven shapes (textures only darken the hue). Each
subject breaks that rule in one way: two hues on one object (a star inside a star, a
two-coloured heart or diamond) or a shape outside the
seven (a ring, a crescent), so the base model can only draw it after fine-tuning.

Every subject has a *class* in the world's caption grammar, the colour and shape it
is closest to ("orange star"): the base model draws that class, so prior preservation
is measured on something the model knows. The instance prompt puts the identifier in
front of it ("a large sks orange star"), and every instance image carries a full world
caption (``metadata.jsonl``: "a large sks orange star at the left on a gray background")
so that position and background stay tied to their words, not to the identifier.

    python -m difftune.world.subject assets/subjects            # render every subject
    python -m difftune.world.subject assets/subjects --measure  # and measure them on the base model

``--measure`` stores in each ``subject.json``: how often the base model's images of the
class prompt show the class shape and colour (world-CLIP zero-shot: the class is only
useful if the base draws it); the subject's ceiling, the mean pairwise CLIP-I of its
instance images (a model that draws the subject exactly as the instance images vary
scores about this); and the same for the instance images passed through the model's VAE,
the ceiling of any denoiser fine-tune (the 4× VAE loses small two-hue patterns).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DifftuneError, run_main
from ..io import write_json
from ..paths import SUBJECT_FILE
from .scenes import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    POSITION_PHRASES,
    POSITIONS,
    RARE_IDENTIFIER,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    _pixel_grid,
    downsample,
    paint_object,
    shape_mask,
    split_seed,
)

DEFAULT_SUBJECT = "star"
CAPTIONS_FILE = "metadata.jsonl"
VIEW_COUNT = 5

# A painter fills a supersampled float canvas: (canvas, centre, radius, rotation) in 64-px units.
Painter = Callable[[np.ndarray, tuple[float, float], float, float], None]


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLORS[name], dtype=np.float32)


def _local_coords(center: tuple[float, float], rotation: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (64-px units) relative to the centre, in the object's rotated frame."""
    x, y = _pixel_grid(size)
    dx, dy = x - center[0], y - center[1]
    theta = math.radians(rotation)
    return dx * math.cos(theta) + dy * math.sin(theta), -dx * math.sin(theta) + dy * math.cos(theta)


def _paint(canvas: np.ndarray, mask: np.ndarray, color: str) -> None:
    paint_object(canvas, mask, _rgb(color), _rgb(color), np.zeros(mask.shape, dtype=bool))


def _paint_star_in_star(canvas, center, radius, rotation):
    size = canvas.shape[0]
    _paint(canvas, shape_mask("star", center, radius, rotation, size), "orange")
    _paint(canvas, shape_mask("star", center, radius * 0.5, rotation, size), "blue")


def _paint_two_tone_heart(canvas, center, radius, rotation):
    size = canvas.shape[0]
    body = shape_mask("heart", center, radius, rotation, size)
    u, _ = _local_coords(center, rotation, size)
    _paint(canvas, body * (u < 0), "red")
    _paint(canvas, body * (u >= 0), "yellow")


def _paint_two_tone_diamond(canvas, center, radius, rotation):
    size = canvas.shape[0]
    body = shape_mask("diamond", center, radius, rotation, size)
    _, v = _local_coords(center, rotation, size)
    _paint(canvas, body * (v >= 0), "purple")
    _paint(canvas, body * (v < 0), "cyan")


def _paint_ring(canvas, center, radius, rotation):
    size = canvas.shape[0]
    ring = shape_mask("circle", center, radius, rotation, size) * (
        1.0 - shape_mask("circle", center, radius * 0.55, rotation, size))
    _paint(canvas, ring, "green")


def _paint_crescent(canvas, center, radius, rotation):
    size = canvas.shape[0]
    theta = math.radians(rotation)
    bite = (center[0] + 0.5 * radius * math.cos(theta), center[1] + 0.5 * radius * math.sin(theta))
    crescent = shape_mask("circle", center, radius, 0.0, size) * (
        1.0 - shape_mask("circle", bite, radius * 0.85, 0.0, size))
    _paint(canvas, crescent, "yellow")


@dataclass(frozen=True)
class SubjectDesign:
    """One subject: how it is drawn and the world class (colour, shape) it is closest to."""

    name: str
    color: str  # class colour, a world colour
    shape: str  # class shape, a world shape
    description: str
    paint: Painter

    @property
    def class_name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def class_prompt(self) -> str:
        """Large, as the instance images are: the base draws large shapes more reliably."""
        return f"a large {self.class_name}"

    @property
    def instance_prompt(self) -> str:
        return f"a large {RARE_IDENTIFIER} {self.class_name}"

    def caption(self, position: str, background: str) -> str:
        """A full world caption of one instance image, with the identifier before the class."""
        return (f"a large {RARE_IDENTIFIER} {self.class_name} {POSITION_PHRASES[position]} "
                f"on a {background} background")


SUBJECTS: dict[str, SubjectDesign] = {design.name: design for design in (
    SubjectDesign("star", "orange", "star", "an orange star with a smaller blue star inside it: two hues "
                  "on one object, which the world never draws", _paint_star_in_star),
    SubjectDesign("heart", "red", "heart", "a heart red on its left half and yellow on its right: two hues "
                  "on one object", _paint_two_tone_heart),
    SubjectDesign("diamond", "purple", "diamond", "a diamond cyan on its upper half and purple on its "
                  "lower half: two hues on one object", _paint_two_tone_diamond),
    SubjectDesign("ring", "green", "circle", "a green ring, a circle with a hole showing the background: "
                  "a shape outside the world's seven", _paint_ring),
    SubjectDesign("crescent", "yellow", "circle", "a yellow crescent moon: a shape outside the world's "
                  "seven", _paint_crescent),
)}
assert all(d.color in COLORS and d.shape in SHAPES for d in SUBJECTS.values())


def render_subject(design: SubjectDesign, center: tuple[float, float], radius: float, rotation: float,
                   background_rgb: tuple[int, int, int]) -> np.ndarray:
    """The subject on a plain background, as a 64×64×3 uint8 image."""
    size = IMAGE_SIZE * SUPERSAMPLE
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = np.asarray(background_rgb, dtype=np.float32)
    design.paint(canvas, center, radius, rotation)
    return downsample(canvas)


def subject_views(name: str = DEFAULT_SUBJECT, count: int = VIEW_COUNT) -> list[dict]:
    """Deterministic views of a subject: each a different background and position, always large.

    Subjects pair backgrounds and positions differently (an offset per subject), so that
    no background is tied to one position across the set.
    """
    if not 1 <= count <= len(BACKGROUNDS):
        raise DifftuneError(f"count must be between 1 and {len(BACKGROUNDS)}, got {count}")
    offset = list(SUBJECTS).index(name)
    views = []
    for index in range(count):
        rng = np.random.default_rng(split_seed("subject", 1000 * offset + index))
        background = tuple(BACKGROUNDS)[index]
        position = tuple(POSITIONS)[(index + offset) % len(POSITIONS)]
        anchor = POSITIONS[position]
        views.append({
            "background": background,
            "position": position,
            "center": (anchor[0] + rng.uniform(-2, 2), anchor[1] + rng.uniform(-2, 2)),
            "radius": float(rng.uniform(*SIZES["large"])),
            "rotation": float(rng.uniform(-8, 8)),
        })
    return views


def write_subject_assets(directory: str | Path, name: str = DEFAULT_SUBJECT,
                         count: int = VIEW_COUNT) -> dict:
    """Write a subject's instance PNGs, their captions and ``subject.json``; returns the json.

    Measurements already in an existing ``subject.json`` are kept (rendering is deterministic).
    """
    if name not in SUBJECTS:
        raise DifftuneError(f"unknown subject {name!r}; known: {', '.join(SUBJECTS)}")
    design = SUBJECTS[name]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _read_json(directory / SUBJECT_FILE)
    images, captions = [], []
    for index, view in enumerate(subject_views(name, count)):
        image = render_subject(design, view["center"], view["radius"], view["rotation"],
                               BACKGROUNDS[view["background"]])
        file_name = f"instance_{index:02d}.png"
        Image.fromarray(image).save(directory / file_name)
        caption = design.caption(view["position"], view["background"])
        images.append({"file": file_name, "background": view["background"], "position": view["position"],
                       "caption": caption})
        captions.append(json.dumps({"file_name": file_name, "text": caption}))
    (directory / CAPTIONS_FILE).write_text("\n".join(captions) + "\n")
    info = {
        "name": name,
        "instance_prompt": design.instance_prompt,
        "class_prompt": design.class_prompt,
        "class_name": design.class_name,
        "class_color": design.color,
        "class_shape": design.shape,
        "identifier": RARE_IDENTIFIER,
        "description": design.description,
        "images": images,
        "rendered_by": f"python -m difftune.world.subject <folder> --subjects {name}",
    }
    if "measured" in previous:
        info["measured"] = previous["measured"]
    write_json(directory / SUBJECT_FILE, info)
    return info


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def measure_subject(directory: str | Path, pipe, clip_model, clip_tokenizer, similarity,
                    class_images: int = 50, settings=None) -> dict:
    """Base-model class accuracy and the CLIP-I ceiling of one rendered subject; stored in subject.json.

    ``pipe`` is the base pipeline, ``clip_model``/``clip_tokenizer`` the world CLIP for
    zero-shot colour and shape, ``similarity`` a `ClipSimilarity` for CLIP-I.
    """
    import torch

    from ..metrics.similarity import cosine_matrix
    from ..metrics.subject import load_images
    from .clip_model import classify_color_shape
    from .quality import SamplingSettings, generate

    directory = Path(directory)
    info = _read_json(directory / SUBJECT_FILE)
    if not info:
        raise DifftuneError(f"{directory / SUBJECT_FILE} does not exist: render the subject first")
    settings = settings or SamplingSettings()
    images = generate(pipe, [info["class_prompt"]] * class_images, settings)
    predictions = classify_color_shape(clip_model, clip_tokenizer, images)
    pictures = load_images(directory, "subject folder")
    instance = similarity.image_embeddings(pictures)
    reconstructed = similarity.image_embeddings(vae_round_trip(pipe, pictures))
    off_diagonal = ~torch.eye(len(instance), dtype=torch.bool)
    info["measured"] = {
        "class_prompt_images": class_images,
        "class_shape_accuracy": float(np.mean([p[1] == info["class_shape"] for p in predictions])),
        "class_color_accuracy": float(np.mean([p[0] == info["class_color"] for p in predictions])),
        "ceiling_clip_i": round(float(cosine_matrix(instance, instance)[off_diagonal].mean()), 4),
        "vae_clip_i": round(float(cosine_matrix(reconstructed, instance)[off_diagonal].mean()), 4),
        "sampling": {"steps": settings.steps, "guidance_scale": settings.guidance_scale,
                     "seed": settings.seed},
        "judged_by": "world CLIP zero-shot (assets/embedded_model/world_clip)",
    }
    write_json(directory / SUBJECT_FILE, info)
    return info


def vae_round_trip(pipe, images: list) -> list:
    """The images through the pipeline's VAE (encode, decode the mean): what any denoiser, however
    well fine-tuned, can at best give back; a pattern the VAE loses cannot be learnt."""
    import torch
    from PIL import Image as PILImage

    pixels = torch.stack([torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
                          for image in images]).float() / 127.5 - 1
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        decoded = vae.decode(latents).sample.float().clamp(-1, 1)
    arrays = ((decoded.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return [PILImage.fromarray(array) for array in arrays]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the DreamBooth subjects of the embedded world "
                                                 "(images, captions, subject.json), and measure them.")
    parser.add_argument("directory", type=Path, help="parent folder, e.g. assets/subjects: each subject "
                                                      "goes to <directory>/<name>")
    parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS),
                        help="which subjects (default: all)")
    parser.add_argument("--count", type=int, default=VIEW_COUNT,
                        help=f"instance images per subject, 1..{len(BACKGROUNDS)}")
    parser.add_argument("--measure", action="store_true",
                        help="also measure class accuracy and ceiling on builtin:embedded")
    parser.add_argument("--class_images", type=int, default=50,
                        help="base-model images of each class prompt for --measure")
    args = parser.parse_args(argv)
    if args.class_images < 1:
        parser.error(f"--class_images must be at least 1, got {args.class_images}")
    for name in args.subjects:
        write_subject_assets(args.directory / name, name, args.count)
    if args.measure:
        import torch

        from ..metrics.cli import EMBEDDED_CLIP
        from ..metrics.similarity import ClipSimilarity
        from ..model_factory import load_pipeline
        from .clip_model import load_world_clip

        pipe = load_pipeline("builtin:embedded", torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        clip_model, clip_tokenizer = load_world_clip(EMBEDDED_CLIP)
        similarity = ClipSimilarity.from_pretrained(EMBEDDED_CLIP)
        from tqdm.auto import tqdm

        for name in tqdm(args.subjects, desc="measure", unit="subject"):
            measure_subject(args.directory / name, pipe, clip_model, clip_tokenizer, similarity,
                            args.class_images)
    rows = ["| subject | class prompt | class shape / colour (base) | ceiling CLIP-I | through the VAE |",
            "|---|---|---|---|---|"]
    for name in args.subjects:
        info = _read_json(args.directory / name / SUBJECT_FILE)
        measured = info.get("measured")
        numbers = (f"{measured['class_shape_accuracy']:.0%} / {measured['class_color_accuracy']:.0%} | "
                   f"{measured['ceiling_clip_i']:.3f} | {measured['vae_clip_i']:.3f}" if measured
                   else "not measured | – | –")
        rows.append(f"| {name} | {info['class_prompt']} | {numbers} |")
    print("\n".join(rows))


if __name__ == "__main__":
    run_main(main)
