"""dinocell: DINOv3-family self-supervised training for scientific images."""

__version__ = "0.1.0"
