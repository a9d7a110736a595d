"""Datasets (catalog + builtin registrations), readers, and data loading."""
from .catalog import BoxMode, DatasetCatalog, DatasetPath, Metadata, MetadataCatalog, datasets_root  # noqa: F401
from . import datasets  # noqa: F401  (registers the builtin datasets)
from .build import build_detection_train_loader, build_detection_test_loader  # noqa: E402
