from .config import SaraConfig
from .functional import auto_learning_rate
from .model import SaraAdapter

__all__ = ["SaraAdapter", "SaraConfig", "auto_learning_rate"]
