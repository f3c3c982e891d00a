"""The DreamBooth evaluation protocol: generate from a prompt list, score against the subject.

For one (model, subject): N images per prompt, each from its own seeded generator (so an
image does not depend on the batch it was drawn in), then

- DINO and CLIP-I: mean cosine between every generated image and every subject image,
- CLIP-T: prompt fidelity with the identifier replaced by the class name,
- CLIP score: prompt fidelity with the prompt as written (floored at 0),
- FID/KID (optional): generated images against a reference folder (e.g. class images),
- prior preservation (optional): the same prompts without the identifier ("a dog on the
  beach"), same seeds; PRES is DINO between those images and the subject images (CLIP-I
  without a DINO model; lower: the model still draws the class, not the subject) and
  class CLIP-T their CLIP-T against those class prompts,
- a video model's clips: every metric over their frames, plus temporal consistency
  (`difftune.metrics.video`).

``difftune evaluate`` and ``difftune benchmark`` (difftune/commands/) are thin command lines over this.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..api import find_denoiser, load_adapter, merge_adapter, remove_adapter
from ..errors import DifftuneError
from ..io import read_text
from ..paths import ASSETS_DIR, IMAGE_SUFFIXES, SUBJECT_FILE
from ..sampling import GenerationSettings, generate_image_sets, generate_images, image_seed  # noqa: F401 (re-exported)
from .features import extract_features
from .fid import fid_from_features
from .similarity import ClipSimilarity, DinoSimilarity, mean_pairwise_cosine, neutral_prompt
from .video import VIDEO_COLUMNS, VIDEO_HEADERS, frames_of, is_clip, temporal_consistency, video_columns

PROMPT_LISTS = {
    "dreambooth": ASSETS_DIR / "prompts" / "subject_prompts.txt",
    "world": ASSETS_DIR / "prompts" / "world_subject_prompts.txt",
}
# Disjoint from the lists above: what a learning-rate sweep is scored on.
VALIDATION_PROMPT_LISTS = {
    "dreambooth": ASSETS_DIR / "prompts" / "subject_validation_prompts.txt",
    "world": ASSETS_DIR / "prompts" / "world_subject_validation_prompts.txt",
}


def model_label(name: str) -> str:
    """A metric model as reports name it: a shipped asset by its place in the project
    (``assets/...``), not by this install's absolute path, so shared results read the same."""
    return name.replace(f"{ASSETS_DIR.parent}{os.sep}", "")


def load_images(directory: str | Path, what: str = "image folder") -> list[Image.Image]:
    """All images of a folder (sorted by name) as RGB PIL images; a clear error if there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DifftuneError(f"{what} {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DifftuneError(f"{what} {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DifftuneError(f"{what}: cannot read image {path} (corrupt or truncated?): {err}") from None
    return images


@dataclass
class Subject:
    """A DreamBooth subject: reference images, the identifier token and the class noun."""

    name: str
    directory: Path
    identifier: str
    class_name: str
    images: list[Image.Image] = field(repr=False)

    @classmethod
    def from_dir(cls, directory: str | Path, identifier: str | None = None,
                 class_name: str | None = None, clips: bool = False) -> Subject:
        """Images of a folder (with ``clips``: every frame of its clips and images); identifier / class
        from the arguments, else the folder's subject.json."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DifftuneError(f"subject folder {directory} does not exist")
        meta: dict[str, Any] = {}
        meta_file = directory / SUBJECT_FILE
        if meta_file.is_file():
            try:
                meta = json.loads(read_text(meta_file))
            except json.JSONDecodeError as err:
                raise DifftuneError(f"{meta_file}: not valid JSON: {err}") from None
            if not isinstance(meta, dict):
                raise DifftuneError(f"{meta_file}: expected a JSON object with identifier and class_name")
        identifier = identifier or meta.get("identifier") or "sks"
        class_name = class_name or meta.get("class_name")
        if not class_name:
            raise DifftuneError(f"no class name for the subject in {directory}: pass --class_name "
                                f"or put {{\"class_name\": ...}} in {meta_file}")
        if clips:
            from .video import subject_frames

            images = subject_frames(directory)
        else:
            images = load_images(directory, "subject folder")
        return cls(meta.get("name") or directory.name, directory, identifier, class_name, images)


def load_prompts(path: str | Path, identifier: str, class_name: str, limit: int | None = None) -> list[str]:
    """Prompt templates, one a line (# comments); ``{subject}`` → "identifier class", ``{class}``."""
    path = Path(path)
    if not path.is_file():
        raise DifftuneError(f"prompt list {path} does not exist")
    templates = [line.strip() for line in read_text(path, "prompt list").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise DifftuneError(f"prompt list {path} holds no prompts")
    prompts = []
    for number, template in enumerate(templates, 1):
        try:
            prompts.append(template.format(subject=f"{identifier} {class_name}", identifier=identifier,
                                           **{"class": class_name}))
        except (KeyError, IndexError) as error:
            raise DifftuneError(f"{path}, prompt {number}: unknown placeholder {error} "
                                "(use {subject}, {identifier}, {class})") from error
    return prompts[:limit] if limit else prompts


def class_prompts(prompts: list[str], subject: Subject) -> list[str]:
    """The prompts without the identifier ("a sks dog on a beach" → "a dog on a beach").

    These are the texts CLIP-T scores against; for prior preservation they are also
    generated from. A prompt that still holds the identifier is refused.
    """
    result = [neutral_prompt(p, subject.identifier, subject.class_name) for p in prompts]
    word = re.compile(rf"(?<!\w){re.escape(subject.identifier)}(?!\w)")
    left = [p for p in result if word.search(p)]
    if left:
        raise DifftuneError(f"the identifier {subject.identifier!r} could not be removed from the prompt "
                            f"{left[0]!r}; use another identifier or --no_class_prompts")
    return result


class SubjectScorer:
    """The protocol's metrics for one subject; reference embeddings and features are cached."""

    def __init__(self, clip: ClipSimilarity, dino: DinoSimilarity | None = None,
                 fid_extractor: nn.Module | None = None, batch_size: int = 32) -> None:
        self.clip = clip
        self.dino = dino
        self.fid_extractor = fid_extractor
        self.batch_size = batch_size
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def _reference(self, kind: str, key: str, images: list[Image.Image]) -> torch.Tensor:
        if (kind, key) not in self._cache:
            if kind == "clip":
                features = self.clip.image_embeddings(images)
            elif kind == "dino":
                features = self.dino.image_embeddings(images)
            else:
                features = extract_features(self.fid_extractor, images, self.batch_size,
                                            f"FID reference {key}")
            self._cache[(kind, key)] = features
        return self._cache[(kind, key)]

    def score(self, generated: list[list[Image.Image]], prompts: list[str], subject: Subject,
              fid_reference: tuple[str, list[Image.Image]] | None = None) -> dict[str, Any]:
        """Metrics of generated images (per prompt lists) against the subject; per-prompt detail too."""
        flat = [image for group in generated for image in group]
        flat_prompts = [prompt for prompt, group in zip(prompts, generated, strict=True) for _ in group]
        counts = [len(group) for group in generated]
        key = str(subject.directory)
        clip_embeddings = self.clip.image_embeddings(flat, desc="CLIP embeddings")
        clip_ref = self._reference("clip", key, subject.images)
        neutral = [neutral_prompt(p, subject.identifier, subject.class_name) for p in flat_prompts]
        clip_t = self.clip.clip_score(None, neutral, floor=False, image_embeddings=clip_embeddings)
        clip_score = self.clip.clip_score(None, flat_prompts, floor=True, image_embeddings=clip_embeddings)
        clip_i_matrix = clip_embeddings @ clip_ref.T
        dino_matrix = None
        if self.dino is not None:
            dino_embeddings = self.dino.image_embeddings(flat, desc="DINO embeddings")
            dino_matrix = dino_embeddings @ self._reference("dino", key, subject.images).T

        per_prompt = []
        start = 0
        for prompt, count in zip(prompts, counts, strict=True):
            rows = slice(start, start + count)
            per_prompt.append({
                "prompt": prompt,
                "clip_t": float(clip_t[rows].mean()),
                "clip_score": float(clip_score[rows].mean()),
                "clip_i": float(clip_i_matrix[rows].mean()),
                "dino": float(dino_matrix[rows].mean()) if dino_matrix is not None else None,
            })
            start += count
        result: dict[str, Any] = {
            "subject": subject.name,
            "identifier": subject.identifier,
            "class_name": subject.class_name,
            "generated_images": len(flat),
            "reference_images": len(subject.images),
            "prompts": len(prompts),
            "dino": float(dino_matrix.mean()) if dino_matrix is not None else None,
            "clip_i": mean_pairwise_cosine(clip_embeddings, clip_ref),
            "clip_t": float(clip_t.mean()),
            "clip_score": float(clip_score.mean()),
            "clip_model": self.clip.name,
            "dino_model": self.dino.name if self.dino is not None else None,
            "fid": None,
            "per_prompt": per_prompt,
        }
        if fid_reference is not None and self.fid_extractor is not None:
            name, images = fid_reference
            real = self._reference("fid", name, images)
            fake = extract_features(self.fid_extractor, flat, self.batch_size, "FID generated")
            result["fid"] = fid_from_features(real, fake, self.fid_extractor).to_dict()
        return result


# ---------------------------------------------------------------- many adapters × subjects

@dataclass
class EvalRun:
    """One row of an evaluation: a name, an adapter file (None: the base model), a subject."""

    name: str
    adapter: Path | None
    subject: Subject
    scale: float = 1.0


def run_signature(run: EvalRun, prompts: list[str], settings: GenerationSettings, scorer: SubjectScorer,
                  fid_reference: str | None, model: str,
                  class_prompt_list: list[str] | None = None) -> dict[str, Any]:
    """Everything a stored result depends on; a result with another signature is recomputed.

    The class prompts enter only when they are evaluated, so results stored without them
    stay valid for runs without them.
    """
    adapter_stamp = None
    if run.adapter is not None:
        stat = Path(run.adapter).stat()
        adapter_stamp = [str(run.adapter), stat.st_size, stat.st_mtime_ns]
    signature = {
        "model": model,
        "adapter": adapter_stamp,
        "scale": run.scale,
        "subject": str(run.subject.directory),
        "prompts": prompts,
        "generation": settings.to_dict(),
        "clip_model": scorer.clip.name,
        "dino_model": scorer.dino.name if scorer.dino is not None else None,
        "fid_reference": fid_reference,
        "fid_extractor": getattr(scorer.fid_extractor, "name", None) if fid_reference else None,
    }
    if class_prompt_list is not None:
        signature["class_prompts"] = class_prompt_list
    return signature


def run_prompts(prompt_file: str | Path, subject: Subject, num_prompts: int | None = None,
                with_class_prompts: bool = False) -> tuple[list[str], list[str] | None]:
    """A subject's prompts and, if asked, its class prompts: what ``evaluate_runs`` generates from.

    Scripts call it before any heavy work, so that a bad prompt file or an identifier the
    prompts cannot lose fails at once.
    """
    prompts = load_prompts(prompt_file, subject.identifier, subject.class_name, num_prompts)
    return prompts, class_prompts(prompts, subject) if with_class_prompts else None


def evaluate_runs(pipe: Any, runs: list[EvalRun], prompt_file: str | Path, settings: GenerationSettings,
                  scorer: SubjectScorer, output_dir: str | Path, model: str,
                  fid_reference: tuple[str, list[Image.Image]] | None = None,
                  num_prompts: int | None = None, overwrite: bool = False,
                  grid_cell: int = 128, with_class_prompts: bool = False,
                  merge_adapters: bool = False) -> list[dict[str, Any]]:
    """Generate, save images and a grid, score; ``output_dir/<name>/<subject>/metrics.json`` per run.

    ``with_class_prompts``: also generate from the class prompts (``class_images/``,
    ``class_grid.png``), in the same pipeline calls as the prompts, and report ``pres`` (DINO; None
    without a DINO model), ``pres_clip_i`` and ``class_clip_t``, with per-prompt detail under
    ``class_prompts``. ``merge_adapters``: fold each adapter into the weights while drawing (the same
    model to float rounding, without the adapter's arithmetic in every denoiser call; the exact base
    weights come back after). A run whose ``metrics.json`` has the same signature is read back, not
    recomputed.
    """
    from ..io import read_json, write_json

    output_dir = Path(output_dir)
    denoiser, _ = find_denoiser(pipe)
    results = []
    for run in runs:
        prompts, class_prompt_list = run_prompts(prompt_file, run.subject, num_prompts, with_class_prompts)
        signature = run_signature(run, prompts, settings, scorer, fid_reference and fid_reference[0], model,
                                  class_prompt_list)
        run_dir = output_dir / run.name / run.subject.name
        metrics_file = run_dir / "metrics.json"
        if not overwrite and metrics_file.is_file():
            stored = read_json(metrics_file)
            if stored.get("signature") == signature:
                print(f"{run.name} / {run.subject.name}: up to date, read from {metrics_file}")
                results.append(stored)
                continue
        method = "base"
        if run.adapter is not None:
            # a difftune file, or another tool's LoRA file (imported as a difftune LoRA)
            method = load_adapter(pipe, run.adapter, scale=run.scale).method
            # the adapter's tensors join the pipeline's device and dtype (fp16 generation on GPU)
            denoiser.to(device=pipe.device, dtype=pipe.dtype)
        try:
            if run.adapter is not None and merge_adapters:
                merge_adapter(pipe, unload=False)  # remove_adapter below restores the exact weights
            # with the class prompts: the same seeds, image k of prompt p in both sets
            prompt_sets = [prompts] if class_prompt_list is None else [prompts, class_prompt_list]
            generated, *class_sets = generate_image_sets(pipe, prompt_sets, settings,
                                                         desc=f"{run.name} / {run.subject.name}")
            class_generated = class_sets[0] if class_sets else None
        finally:
            if run.adapter is not None:
                remove_adapter(pipe)
        grid = save_samples(run_dir, "", generated, prompts, settings.images_per_prompt, grid_cell)
        metrics = scorer.score(frames_of(generated), prompts, run.subject, fid_reference)
        result = {"name": run.name, "method": method,
                  "adapter": str(run.adapter or ""), "scale": run.scale, **metrics}
        clips = [sample for group in generated for sample in group if is_clip(sample)]
        if clips:  # a video model: the image metrics were over frames
            result.update(generated_clips=len(clips), frames_per_clip=len(clips[0]),
                          temporal_consistency=temporal_consistency(scorer.clip, clips))
        if class_generated is not None:
            class_grid = save_samples(run_dir, "class_", class_generated, class_prompt_list,
                                      settings.images_per_prompt, grid_cell)
            prior = scorer.score(frames_of(class_generated), class_prompt_list, run.subject)
            # the class prompts hold no identifier, so prior["clip_t"] scores against them as written
            result.update(pres=prior["dino"], pres_clip_i=prior["clip_i"], class_clip_t=prior["clip_t"],
                          class_prompts={"generated_images": prior["generated_images"],
                                         "clip_score": prior["clip_score"], "per_prompt": prior["per_prompt"],
                                         "grid": str(grid_path_relative(class_grid, output_dir))})
        result.update(grid=str(grid_path_relative(grid, output_dir)), signature=signature)
        write_json(metrics_file, result)
        results.append(result)
    return results


def save_samples(run_dir: Path, prefix: str, generated: list[list[Image.Image]], prompts: list[str],
                 columns: int, grid_cell: int) -> Path:
    """``<prefix>images/p<prompt>_<k>.png`` (a clip: ``.webp``, animated) and a captioned
    ``<prefix>grid.png`` (of a clip, its first frame); returns the grid's path."""
    from ..io import save_image
    from ..video.clips import save_webp
    from .reporting import image_grid

    for p, group in enumerate(generated):
        for k, image in enumerate(group):
            if is_clip(image):
                save_webp(image, run_dir / f"{prefix}images" / f"p{p:02d}_{k}.webp")
            else:
                save_image(run_dir / f"{prefix}images" / f"p{p:02d}_{k}.png", image)
    grid = image_grid([image[0] if is_clip(image) else image for group in generated for image in group],
                      columns=columns, row_captions=prompts, cell_size=grid_cell)
    return save_image(run_dir / f"{prefix}grid.png", grid)


def grid_path_relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


SUMMARY_COLUMNS = ["name", "method", "subject", "generated_images", "dino", "clip_i", "clip_t",
                   "clip_score", "fid", "kid"]
PRIOR_COLUMNS = ["pres", "pres_clip_i", "class_clip_t"]
SUMMARY_HEADERS = {"name": "run", "generated_images": "images", "dino": "DINO", "clip_i": "CLIP-I",
                   "clip_t": "CLIP-T", "clip_score": "CLIP", "fid": "FID", "kid": "KID", "pres": "PRES",
                   "pres_clip_i": "PRES-CLIP-I", "class_clip_t": "class CLIP-T", **VIDEO_HEADERS}


def prior_columns(results: list[dict[str, Any]]) -> list[str]:
    """PRES and class CLIP-T where the class prompts were evaluated, else nothing.

    PRES is the DINO one; without a DINO model it is PRES-CLIP-I (CLIP image embeddings).
    """
    if all(r.get("class_clip_t") is None for r in results):
        return []
    pres = "pres" if any(r.get("pres") is not None for r in results) else "pres_clip_i"
    return [pres, "class_clip_t"]


def summary_columns(results: list[dict[str, Any]]) -> list[str]:
    """SUMMARY_COLUMNS, then ``prior_columns`` and a video model's ``video_columns``."""
    return [*SUMMARY_COLUMNS, *prior_columns(results), *video_columns(results)]


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows (FID/KID as numbers) for the markdown and CSV tables."""
    rows = []
    for result in results:
        fid = result.get("fid") or {}
        rows.append({**{k: result.get(k) for k in SUMMARY_COLUMNS + PRIOR_COLUMNS + VIDEO_COLUMNS},
                     "fid": fid.get("fid"), "kid": fid.get("kid_mean")})
    return rows


def models_note(clip_model: str, dino_model: str | None, missing: str = "not computed") -> str:
    """The metric models of a table, stated once below it and named by ``model_label``."""
    dino = model_label(dino_model) if dino_model else missing
    return f"CLIP: {model_label(clip_model)}; DINO: {dino}."


def fid_note(results: list[dict[str, Any]]) -> str:
    """The FID setting of a table, stated once below it (every FID of one table shares it)."""
    settings = {(f["extractor"], f["resize"], f["real_count"], f["generated_count"])
                for r in results if (f := r.get("fid"))}
    return "\n".join(f"FID/KID: {model_label(e)}, {rz}, {rc} reference / {gc} generated images."
                     for e, rz, rc, gc in sorted(settings))
