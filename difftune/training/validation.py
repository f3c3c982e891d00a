"""Validation samples of a training run in the experiment tracker (drawing them: `difftune.sampling`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def log_images(accelerator: Any, tag: str, images: Sequence[Image.Image], step: int) -> None:
    """Send images to every active tracker that takes images (TensorBoard, W&B)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=step)
