"""Small shared utilities: distributed helpers (``comm``), atomic writes (``file_io``), CUDA graph capture (``cuda_graph``),
``MODEL.DEVICE`` resolution (``device``) and model unwrapping (``modules``)."""
from . import comm

__all__ = ["comm"]
