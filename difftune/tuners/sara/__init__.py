from .config import SaraConfig
from .model import SaraAdapter, auto_learning_rate

__all__ = ["SaraAdapter", "SaraConfig", "auto_learning_rate"]
