from .config import FullConfig
from .layer import FullLayer
from .model import FullAdapter

__all__ = ["FullAdapter", "FullConfig", "FullLayer"]
