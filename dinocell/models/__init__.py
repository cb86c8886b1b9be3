"""Backbones (DINOv3 ViT family, torchvision ResNets) and loading of pretrained weights."""

from dinocell.models.backbones import BACKBONE_ARCHS, Backbone, build_backbone, check_arch
from dinocell.models.pretrained import LoadReport, WeightsError, load_pretrained
from dinocell.models.resnet import RESNET_ARCHS, ResNetBackbone
from dinocell.models.vision_transformer import ARCHS, DinoVisionTransformer

__all__ = [
    "ARCHS",
    "BACKBONE_ARCHS",
    "RESNET_ARCHS",
    "Backbone",
    "DinoVisionTransformer",
    "LoadReport",
    "ResNetBackbone",
    "WeightsError",
    "build_backbone",
    "check_arch",
    "load_pretrained",
]
