from .config import LoraConfig
from .model import LoraAdapter

__all__ = ["LoraAdapter", "LoraConfig"]
