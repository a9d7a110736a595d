"""eco_m2f: efficient universal segmentation."""
__version__ = "0.1.0"
