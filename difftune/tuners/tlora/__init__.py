from .config import TLoraConfig
from .layer import TLoraLayer
from .model import TLoraAdapter

__all__ = ["TLoraAdapter", "TLoraConfig", "TLoraLayer"]
