"""Captioned training data for the dataset trainer (``difftune train-text-to-image``).

Examples come from an image folder (captions in ``metadata.jsonl`` or a ``.txt`` beside each
image, as diffusers' and kohya's scripts read them) or from a `datasets` dataset by hub name or
local path (``image_column`` / ``caption_column``). Every unreadable image and missing or empty
caption is found before training and named in one line. `CaptionedData` is the subject trainer's
`SubjectData` with three changes: a caption prefix, caption dropout (the empty caption, so the
adapter still learns the unconditional prediction that guidance needs), and aspect buckets
(training/buckets.py).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image, ImageOps

from ..errors import DifftuneError
from ..options import CheckedSettings, at_least, option
from ..streams import RandomDomain, sample_generator
from .buckets import BucketStream
from .data import (
    CAPTION_KEYS,
    CAPTION_SUFFIX,
    METADATA_FILE,
    Example,
    ImageRecord,
    SubjectData,
    read_metadata_captions,
    scan_image_folder,
)

SHOWN_PROBLEMS = 8  # bad examples named in the one-line message; the rest are counted


@dataclasses.dataclass(frozen=True)
class CaptionedSource(CheckedSettings):
    """Where the examples come from (the dataset trainer's flags of the same names); exactly one of
    ``train_data_dir`` and ``dataset_name``."""

    flag_group: ClassVar[str] = "data"

    train_data_dir: str | None = option(
        None, "folder of images with captions: metadata.jsonl rows (file_name + text, caption or prompt) "
              "or a .txt beside each image (which wins)")
    dataset_name: str | None = option(
        None, "or: a datasets dataset by hub name, a data folder or a save_to_disk folder (needs the "
              "datasets package)")
    dataset_config_name: str | None = option(None, "the dataset's configuration, if it has several")
    dataset_split: str = option("train", "the dataset's split to train on")
    image_column: str | None = option(None, "dataset column of the images (default: its image column)")
    caption_column: str | None = option(None, "dataset column or metadata.jsonl key of the captions "
                                              "(default: text, caption or prompt)")
    max_train_samples: int | None = option(None, "train on the first N examples only (by file name, or in "
                                                 "dataset order)", check=at_least(1))
    skip_bad_examples: bool = option(False, "leave unreadable images and missing or empty captions out "
                                            "(named in one warning) instead of stopping before training")
    caption_prefix: str = option("", "put before every caption, e.g. 'mystyle style,' (a space is added "
                                     "between)")

    @property
    def flag(self) -> str:
        """How messages name the source: ``--train_data_dir <folder>`` or ``--dataset_name <name>``."""
        if self.train_data_dir:
            return f"--train_data_dir {self.train_data_dir}"
        return f"--dataset_name {self.dataset_name}"


def read_examples(source: CaptionedSource) -> list[ImageRecord]:
    """The source's examples, checked (every bad one named at once), first ``max_train_samples``
    only, each caption with the prefix."""
    problems: list[str] = []
    if bool(source.train_data_dir) == bool(source.dataset_name):
        raise DifftuneError("give the training images as --train_data_dir (a folder) or --dataset_name "
                            "(a datasets dataset by hub name or local path), one of the two")
    if source.train_data_dir:
        records = folder_examples(source, problems)
    else:
        records = dataset_examples(source, problems)
    records = check_examples(records, problems, source)
    return [dataclasses.replace(r, caption=with_prefix(source.caption_prefix, r.caption)) for r in records]


def with_prefix(prefix: str, caption: str) -> str:
    """``prefix`` before the caption, a space between unless the prefix ends in one."""
    if not prefix:
        return caption
    return f"{prefix}{'' if prefix[-1].isspace() else ' '}{caption}"


def folder_examples(source: CaptionedSource, problems: list[str]) -> list[ImageRecord]:
    """An image folder's images with their captions; unreadable images, images without a caption
    and ``metadata.jsonl`` rows naming no image go to ``problems``."""
    flag = "--train_data_dir"
    records = scan_image_folder(source.train_data_dir, flag, source.caption_column, problems)
    folder = Path(source.train_data_dir)
    present = {path.name for path in folder.iterdir()}
    for name in read_metadata_captions(folder, source.caption_column, flag):
        if name not in present:
            problems.append(f"{METADATA_FILE} names {name}, which is not in the folder")
    for record in records:
        if record.caption is None:
            problems.append(f"{record.path.name}: no caption (no {record.path.stem}{CAPTION_SUFFIX} and no "
                            f"{METADATA_FILE} row)")
    if source.max_train_samples is not None:
        records = records[:source.max_train_samples]
    return records


def _load_dataset(source: CaptionedSource) -> Any:
    """The split of a saved dataset folder (``save_to_disk``), a data folder or a hub dataset."""
    try:
        import datasets
    except ImportError:
        raise DifftuneError(f"{source.flag} needs the datasets package, which is not installed: pip "
                            "install datasets (or give an image folder as --train_data_dir)") from None
    path = Path(source.dataset_name)
    saved = path.is_dir() and any((path / name).is_file()
                                  for name in ("dataset_dict.json", "dataset_info.json", "state.json"))
    try:
        if saved:
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if source.dataset_split not in loaded:
                    raise DifftuneError(f"{source.flag}: no split '{source.dataset_split}' (splits: "
                                        f"{', '.join(loaded)}); choose one with --dataset_split")
                loaded = loaded[source.dataset_split]
            return loaded
        return datasets.load_dataset(source.dataset_name, source.dataset_config_name,
                                     split=source.dataset_split)
    except DifftuneError:
        raise
    except Exception as err:  # hub, network, format and split errors all mean: cannot use it
        text = str(err).strip().splitlines()
        raise DifftuneError(f"{source.flag}: cannot load it: {text[0] if text else type(err).__name__}"
                            ) from None


def _column(names: Sequence[str], given: str | None, fallbacks: Sequence[str], flag: str,
            source: CaptionedSource) -> str:
    if given is not None:
        if given not in names:
            raise DifftuneError(f"{source.flag}: {flag} '{given}' is not a column (columns: "
                                f"{', '.join(names)})")
        return given
    found = next((name for name in fallbacks if name in names), None)
    if found is None:
        raise DifftuneError(f"{source.flag}: no column {' or '.join(repr(n) for n in fallbacks)}; name it "
                            f"with {flag} (columns: {', '.join(names)})")
    return found


def _dataset_image(dataset: Any, column: str, row: int) -> Image.Image:
    return ImageOps.exif_transpose(dataset[row][column])


def dataset_examples(source: CaptionedSource, problems: list[str]) -> list[ImageRecord]:
    """A `datasets` dataset's rows as examples (images read through the dataset when needed);
    unreadable images and missing, empty or non-text captions go to ``problems``."""
    dataset = _load_dataset(source)
    names = list(dataset.column_names)
    image_features = [name for name, feature in dataset.features.items()
                      if type(feature).__name__ == "Image"]
    image_column = _column(names, source.image_column, [*image_features, "image"], "--image_column", source)
    caption_column = _column(names, source.caption_column, CAPTION_KEYS, "--caption_column", source)
    if source.max_train_samples is not None:
        dataset = dataset.select(range(min(source.max_train_samples, len(dataset))))
    records = []
    for row in range(len(dataset)):
        name = Path(f"{source.dataset_name}[{row}]")
        try:
            example = dataset[row]
            image = ImageOps.exif_transpose(example[image_column])
            image.load()
            width, height = image.size
        except Exception as err:  # a decoder's error, whatever the format
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            problems.append(f"row {row}: unreadable image ({reason})")
            continue
        caption = example[caption_column]
        if not isinstance(caption, str):
            problems.append(f"row {row}: the caption is {type(caption).__name__}, not text")
            continue
        if not caption.strip():
            problems.append(f"row {row}: empty caption")
            continue
        records.append(ImageRecord(name, width, height, caption.strip(),
                                   loader=functools.partial(_dataset_image, dataset, image_column, row)))
    return records


def check_examples(records: list[ImageRecord], problems: list[str],
                   source: CaptionedSource) -> list[ImageRecord]:
    """Refuse the source when any example is bad, naming them all in one line (with
    ``skip_bad_examples``: warn the same way and leave them out)."""
    usable = [r for r in records if r.caption]
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        text = f"{source.flag}: {len(problems)} bad example(s): {shown}{more}"
        if not source.skip_bad_examples:
            raise DifftuneError(f"{text} (fix them, or leave them out with --skip_bad_examples)")
        warnings.warn(f"{text}; left out (--skip_bad_examples)", stacklevel=2)
    if not usable:
        raise DifftuneError(f"{source.flag}: no usable examples")
    return usable


class CaptionedData(SubjectData):
    """`SubjectData` over captioned examples, with caption dropout and, when ``buckets`` gives every
    example's (height, width), aspect buckets: each aligned ``block`` of stream positions (one
    micro-step of every process) is drawn from one bucket."""

    def __init__(self, dataset: Any, *, caption_dropout: float = 0.0,
                 buckets: Sequence[tuple[int, int]] | None = None, block: int = 1, **options: Any):
        super().__init__(dataset, **options)
        self.caption_dropout = caption_dropout
        self.buckets = list(buckets) if buckets is not None else None
        if self.buckets is not None:
            self.stream = BucketStream(self.buckets, block, self.seed)

    @property
    def epoch_length(self) -> int:
        """Stream positions per epoch (buckets repeat a few examples to fill their last block)."""
        return self.stream.length if self.buckets is not None else len(self.dataset)

    def example_size(self, example: Example) -> tuple[int, int]:
        if self.buckets is None:
            return super().example_size(example)
        return self.buckets[example.index]

    def example_prompt(self, position: int, example: Example) -> str:
        if self.caption_dropout:
            generator = sample_generator(self.seed, RandomDomain.CAPTION_DROPOUT, position)
            if torch.rand((), generator=generator) < self.caption_dropout:
                return ""
        return example.prompt

    def cached_prompts(self) -> list[str]:
        return list(dict.fromkeys([*super().cached_prompts(), *([""] if self.caption_dropout else [])]))
