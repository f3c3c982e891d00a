"""Training images: folder checks, captions, preprocessing, caches and reproducible batches.

Randomness is a pure function of the seed and of *where* it is used: the order of the
examples is an endless stream of shuffled epochs, and every example drawn at stream
position p gets its own generator seeded from (seed, p). Crops, flips, the VAE sample,
the noise and the timestep of that example all come from it. So a resumed run sees
exactly the batches and noise of an uninterrupted one, and N processes that each take
a slice of the global batch see the same samples as one process taking all of it
(`difftune.streams`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ..errors import DifftuneError
from ..families import TrainingBatch
from ..io import read_text
from ..paths import IMAGE_SUFFIXES, SUBJECT_FILE
from ..streams import RandomDomain, SampleStream, sample_generator

CAPTION_SUFFIX = ".txt"
METADATA_FILE = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption", "prompt")
INSTANCE, CLASS = 0, 1  # example kinds; class examples are the prior-preservation images


# --- image folders --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its size after EXIF rotation, its own caption."""

    path: Path
    width: int
    height: int
    caption: str | None = None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16-bit scaled down."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(values / peak * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        return to_rgb(upright)


def read_metadata_captions(folder: Path, column: str | None, flag: str) -> dict[str, str]:
    """``file_name`` → caption from a folder's metadata.jsonl (empty without one)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    keys = (column,) if column else CAPTION_KEYS
    captions = {}
    for number, line in enumerate(read_text(path, flag).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DifftuneError(f"{flag}: {path} line {number} is not JSON: {err}") from None
        if not isinstance(row, dict):
            raise DifftuneError(f"{flag}: {path} line {number} must be a JSON object "
                                f"({{\"file_name\": ..., \"text\": ...}}), got {line.strip()[:40]}")
        name = row.get("file_name")
        caption = next((row[k] for k in keys if k in row), None)
        if name is None or caption is None:
            raise DifftuneError(f"{flag}: {path} line {number} needs 'file_name' and one of "
                                f"{', '.join(repr(k) for k in keys)}")
        captions[str(name)] = str(caption).strip()
    return captions


def scan_image_folder(
    folder: str | Path,
    flag: str = "--instance_data_dir",
    caption_column: str | None = None,
) -> list[ImageRecord]:
    """Check an image folder and list its images (sorted by name) with their captions.

    A missing or empty folder and an unreadable image are errors naming them; other
    files are skipped with one warning that names them. Captions come from a sidecar
    ``<image stem>.txt`` or else from ``metadata.jsonl`` (``file_name`` + ``text``,
    ``caption`` or ``prompt``, or ``caption_column``).
    """
    folder = Path(folder)
    files, images = _folder_images(folder, flag)
    image_stems = {p.stem for p in images}
    skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES
               and p.name not in (METADATA_FILE, SUBJECT_FILE)
               and not (p.suffix.lower() == CAPTION_SUFFIX and p.stem in image_stems)]
    if skipped:
        warnings.warn(f"{flag} {folder}: skipping {len(skipped)} file(s) that are not images: "
                      f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}", stacklevel=2)
    captions = read_metadata_captions(folder, caption_column, flag)
    records = []
    for path in images:
        width, height = _image_size(path, flag)
        sidecar = path.with_suffix(CAPTION_SUFFIX)
        caption = read_text(sidecar, flag).strip() if sidecar.is_file() else captions.get(path.name)
        records.append(ImageRecord(path, width, height, caption or None))
    return records


def _folder_images(folder: Path, flag: str) -> tuple[list[Path], list[Path]]:
    """A folder's files and, among them, its images by suffix; a missing, file or imageless folder
    is an error naming it."""
    if not folder.exists():
        raise DifftuneError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise DifftuneError(f"{flag} {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DifftuneError(f"{flag} {folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files, images


def _image_size(path: Path, flag: str) -> tuple[int, int]:
    """(width, height) of an image after EXIF rotation; decoded whole, so a damaged one is named."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).size
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DifftuneError(f"{flag}: cannot read image {path} (corrupt or truncated?): {err}") from None


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """A folder that is there or can be made (nothing is created): not a file, under no file."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise DifftuneError(f"{flag} {folder}: {'is' if path == folder else f'{path} is'} a file, "
                                    "not a folder")
            return


def check_image_folder(folder: str | Path, flag: str = "--instance_data_dir") -> None:
    """The folder exists and every image in it can be read: what a user hears about first, before
    anything that reads the folder's other files (a recipe's subject.json)."""
    for path in _folder_images(Path(folder), flag)[1]:
        _image_size(path, flag)


def warn_small_images(records: Sequence[ImageRecord], resolution: int, flag: str) -> None:
    small = [f"{r.path.name} ({r.width}x{r.height})" for r in records if min(r.width, r.height) < resolution]
    if small:
        warnings.warn(f"{flag}: {len(small)} image(s) smaller than --resolution {resolution} will be "
                      f"upscaled (blurry training targets): {', '.join(small[:10])}", stacklevel=2)


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """How an image of ``size`` (width, height) becomes ``target`` (height, width): resized to cover it,
    then cropped at (top, left)."""

    resized: tuple[int, int]  # width, height after resizing
    top: int
    left: int
    target: tuple[int, int]  # height, width

    @classmethod
    def draw(cls, size: tuple[int, int], target: int | tuple[int, int], center_crop: bool,
             generator: torch.Generator) -> CropPlan:
        """The smallest resize that covers ``target`` (a side, or height and width), and a crop
        (centred, or drawn from ``generator``)."""
        width, height = size
        target_h, target_w = (target, target) if isinstance(target, int) else target
        scale = max(target_h / height, target_w / width)
        new_width, new_height = max(target_w, round(width * scale)), max(target_h, round(height * scale))
        if center_crop:
            top, left = (new_height - target_h) // 2, (new_width - target_w) // 2
        else:
            top = int(torch.randint(0, new_height - target_h + 1, (), generator=generator))
            left = int(torch.randint(0, new_width - target_w + 1, (), generator=generator))
        return cls((new_width, new_height), top, left, (target_h, target_w))

    def apply(self, image: Image.Image) -> torch.Tensor:
        """Pixels in [-1, 1], (3, height, width)."""
        resized = image.resize(self.resized, Image.Resampling.BICUBIC)
        height, width = self.target
        cropped = resized.crop((self.left, self.top, self.left + width, self.top + height))
        pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels.contiguous()


def resize_and_crop(
    image: Image.Image, resolution: int | tuple[int, int], center_crop: bool, generator: torch.Generator
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Cover ``resolution`` (a square side, or height and width), then crop (centre or random).

    Returns pixels in [-1, 1] (3, height, width), the original (height, width) and the crop's
    (top, left): SDXL is conditioned on the last two.
    """
    plan = CropPlan.draw(image.size, resolution, center_crop, generator)
    return plan.apply(image), (image.size[1], image.size[0]), (plan.top, plan.left)


# --- the dataset and its stream ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    record: ImageRecord
    prompt: str
    kind: int  # INSTANCE or CLASS
    index: int  # position in its own image list


class SubjectDataset:
    """Instance images with their prompts, each paired with a class image under prior preservation.

    As in DreamBooth, an epoch is max(#instance, #class) items and item i pairs instance
    image i mod #instance with class image i mod #class.
    """

    def __init__(self, instance: Sequence[ImageRecord], instance_prompt: str,
                 class_images: Sequence[ImageRecord] = (), class_prompt: str | None = None):
        self.instance = [Example(r, r.caption or instance_prompt, INSTANCE, i)
                         for i, r in enumerate(instance)]
        # a captioned class image keeps its caption, as instance images do
        self.classes = [Example(r, r.caption or class_prompt or "", CLASS, i)
                        for i, r in enumerate(class_images)]
        if any(not e.prompt for e in self.classes):
            raise DifftuneError("class images need a class prompt (or captions of their own)")

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    @property
    def with_prior(self) -> bool:
        return bool(self.classes)

    def item(self, index: int) -> list[Example]:
        pair = [self.instance[index % len(self.instance)]]
        if self.classes:
            pair.append(self.classes[index % len(self.classes)])
        return pair

    def all_examples(self) -> list[Example]:
        return [*self.instance, *self.classes]

    def prompts(self) -> list[str]:
        return list(dict.fromkeys(e.prompt for e in self.all_examples()))


# --- batches -------------------------------------------------------------------------------

@dataclasses.dataclass
class _PreparedImage:
    moments: torch.Tensor  # the cached posterior, or (uncached) the pixels to encode
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


# ``load_pixels(record, generator) -> (pixels, original (height, width), crop (top, left))``: an example's
# pixels, its random crop (and, for a clip, its frames) drawn from ``generator``
PixelLoader = Callable[[Any, torch.Generator], tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]


class SubjectData:
    """Turns stream positions into batches, from caches when enabled.

    ``encode_images(pixels) -> moments`` and ``encode_prompts(prompts) -> dict`` come
    from the model family. With ``cache_latents`` every image is encoded once (and once
    flipped when ``random_flip``), its random crop drawn once per image; without it,
    crops and flips are drawn per step. With ``cache_prompts`` each distinct prompt is
    encoded once. ``load_pixels`` reads an example (default: the image at ``resolution``;
    difftune.video passes a clip reader, whose examples may differ in frame count: `batches`).
    """

    def __init__(
        self,
        dataset: SubjectDataset,
        *,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_prompts: Callable[[list[str]], dict[str, torch.Tensor]],
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
        cache_latents: bool,
        cache_prompts: bool,
        device: torch.device,
        cache_batch_size: int = 8,
        load_pixels: PixelLoader | None = None,
    ):
        self.dataset = dataset
        self.load_pixels = load_pixels or self._image_pixels
        self.encode_images = encode_images
        self.encode_prompts = encode_prompts
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.device = device
        self.cache_batch_size = cache_batch_size
        self.stream = SampleStream(len(dataset), seed)
        self.latent_cache: dict[tuple[int, int, bool], _PreparedImage] | None = None
        self.prompt_cache: dict[str, dict[str, torch.Tensor]] | None = None
        self._cache_latents = cache_latents
        self._cache_prompts = cache_prompts

    @torch.no_grad()
    def build_caches(self, show_progress: bool = True) -> None:
        if self._cache_prompts:
            prompts = self.dataset.prompts()
            encoded = self.encode_prompts(prompts)
            self.prompt_cache = {prompt: {key: value[i:i + 1] for key, value in encoded.items()}
                                 for i, prompt in enumerate(prompts)}
        if self._cache_latents:
            self.latent_cache = {}
            jobs = [(e, flip) for e in self.dataset.all_examples()
                    for flip in ((False, True) if self.random_flip else (False,))]
            bar = tqdm(total=len(jobs), desc="caching latents", disable=not show_progress)
            for start in range(0, len(jobs), self.cache_batch_size):
                chunk = jobs[start:start + self.cache_batch_size]
                prepared = [self._pixels(e, flip, sample_generator(
                    self.seed, RandomDomain.CACHED_CROP, e.kind, e.index)) for e, flip in chunk]
                for group in _same_shape([p[0] for p in prepared]):
                    pixels = torch.stack([prepared[i][0] for i in group]).to(self.device)
                    for i, m in zip(group, self.encode_images(pixels).cpu(), strict=True):
                        (example, flip), (_, size, crop) = chunk[i], prepared[i]
                        self.latent_cache[(example.kind, example.index, flip)] = _PreparedImage(m, size, crop)
                bar.update(len(chunk))
            bar.close()

    def _image_pixels(self, record: ImageRecord, generator: torch.Generator):
        return resize_and_crop(open_rgb(record.path), self.resolution, self.center_crop, generator)

    def _pixels(self, example: Example, flip: bool, generator: torch.Generator):
        pixels, size, crop = self.load_pixels(example.record, generator)
        return (pixels.flip(-1) if flip else pixels), size, crop

    def batch(self, positions: Sequence[int]) -> TrainingBatch:
        """The examples at these stream positions: instance examples first, then class ones (all of one
        shape; see `batches`)."""
        batches = self.batches(positions)
        if len(batches) > 1:
            raise DifftuneError("the examples of this batch differ in shape (clips of several frame "
                                "counts): use SubjectData.batches")
        return batches[0]

    def batches(self, positions: Sequence[int]) -> list[TrainingBatch]:
        """The examples at these stream positions, instance examples first, then class ones, as one
        batch per shape (one for images; clips of other frame counts go to their own).

        Images are encoded without gradients; uncached prompts are encoded with them, so a
        text encoder that is being trained (``--train_text_encoder``) gets its gradient. What an
        example draws comes from its own generator, so the grouping changes no example.
        """
        items = [(position, self.dataset.item(self.stream.index(position))) for position in positions]
        ordered = [(p, pair[0]) for p, pair in items] + [(p, pair[1]) for p, pair in items if len(pair) > 1]
        generators = [sample_generator(self.seed, RandomDomain.EXAMPLE, p, e.kind) for p, e in ordered]
        prepared = []
        for (_, example), generator in zip(ordered, generators, strict=True):
            flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
            if self.latent_cache is not None:
                prepared.append(self.latent_cache[(example.kind, example.index, flip)])
            else:  # the crop is drawn per step, from the example's generator
                pixels, size, crop = self._pixels(example, flip, generator)
                prepared.append(_PreparedImage(pixels, size, crop))
        groups = _same_shape([p.moments for p in prepared])
        return [self._batch([ordered[i][1] for i in group], [generators[i] for i in group],
                            [prepared[i] for i in group]) for group in groups]

    def _batch(self, examples: list[Example], generators: list[torch.Generator],
               prepared: list[_PreparedImage]) -> TrainingBatch:
        stacked = torch.stack([p.moments for p in prepared]).to(self.device)
        if self.latent_cache is None:  # pixels: encode them now
            with torch.no_grad():
                moments = self.encode_images(stacked)
        else:
            moments = stacked
        prompts = [example.prompt for example in examples]
        if self.prompt_cache is not None:
            conditioning = {key: torch.cat([self.prompt_cache[p][key] for p in prompts])
                            for key in self.prompt_cache[prompts[0]]}
        else:
            conditioning = self.encode_prompts(prompts)
        return TrainingBatch(
            moments=moments,
            conditioning=conditioning,
            original_sizes=torch.tensor([p.original_size for p in prepared], device=self.device),
            crops_top_left=torch.tensor([p.crop_top_left for p in prepared], device=self.device),
            is_prior=torch.tensor([e.kind == CLASS for e in examples], device=self.device),
            generators=generators,
        )


def _same_shape(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by shape, groups in order of their first member."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(index)
    return list(groups.values())
