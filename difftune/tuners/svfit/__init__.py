from .config import SVFitConfig
from .layer import SVFitLayer
from .model import SVFitAdapter

__all__ = ["SVFitAdapter", "SVFitConfig", "SVFitLayer"]
