from .config import PeftMethodConfig
from .model import PeftAdapter

__all__ = ["PeftAdapter", "PeftMethodConfig"]
