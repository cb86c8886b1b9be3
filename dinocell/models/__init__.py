"""Backbones (DINOv3 ViT family) and loading of pretrained weights."""

from dinocell.models.pretrained import LoadReport, WeightsError, load_pretrained
from dinocell.models.vision_transformer import ARCHS, DinoVisionTransformer, build_backbone

__all__ = ["ARCHS", "DinoVisionTransformer", "LoadReport", "build_backbone", "WeightsError", "load_pretrained"]
