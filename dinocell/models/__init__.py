"""Backbones (DINOv3 ViT family) and loading of pretrained weights."""

from dinocell.models.pretrained import LoadReport, load_pretrained
from dinocell.models.vision_transformer import ARCHS, DinoVisionTransformer, build_backbone, check_arch

__all__ = ["ARCHS", "DinoVisionTransformer", "LoadReport", "build_backbone", "check_arch", "load_pretrained"]
