"""Small shared utilities (distributed helpers)."""
from . import comm

__all__ = ["comm"]
