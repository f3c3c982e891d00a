"""Third-party log messages that tell a difftune user nothing they can act on, dropped by exact pattern.

Every run printed them: transformers' note that an image processor falls back to its PIL backend
without torchvision (the fallback computes the same; torchvision is no dependency here), and
diffusers' warning on a dtype cast listing the modules to keep in float32 when that list is empty.
Each filter sits on the one logger that emits its message and drops only that message: anything
else those loggers say, including the same float32 warning with modules in its list, still shows.
Our own calls pass ``dtype=`` (not the deprecated ``torch_dtype=``) to diffusers and transformers,
so their deprecation notices have no cause left.
"""

from __future__ import annotations

import logging
import re

NOISE: dict[str, tuple[re.Pattern[str], ...]] = {
    "transformers.utils.import_utils": (
        re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"),),
    "diffusers.models.modeling_utils": (
        re.compile(r"^There are modules in \w+ that should be kept in float32: \[\]\."),),
}


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[re.Pattern[str], ...]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def silence_third_party_noise() -> None:
    """Install the filters (once; importing difftune does it)."""
    for name, patterns in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
