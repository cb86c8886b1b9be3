"""`build_backbone(arch, **kwargs)`: one entry point for every backbone family, dispatched by the arch name.

Families: the DINOv3 ViT (`vit_*`, dinocell.models.vision_transformer) and torchvision's ResNets (`resnet18/50/101`,
dinocell.models.resnet). Each family takes its own keyword options; an option of another family is an error.
"""

from __future__ import annotations

import difflib

from dinocell.models.resnet import RESNET_ARCHS, ResNetBackbone, build_resnet
from dinocell.models.vision_transformer import ARCHS, DinoVisionTransformer, build_vit

Backbone = DinoVisionTransformer | ResNetBackbone
BACKBONE_ARCHS: tuple[str, ...] = (*ARCHS, *RESNET_ARCHS)


def check_arch(arch: str) -> None:
    """Raise ValueError naming the closest architecture when `arch` is not one of BACKBONE_ARCHS."""
    if arch not in BACKBONE_ARCHS:
        closest = difflib.get_close_matches(arch, BACKBONE_ARCHS, n=1, cutoff=0.0)
        raise ValueError(
            f"unknown architecture {arch!r}; expected one of {', '.join(BACKBONE_ARCHS)}; closest {closest[0]!r}"
        )


def build_backbone(arch: str, **kwargs) -> Backbone:
    """A backbone of a named architecture; kwargs are the family's options (ViT: patch_size, in_chans, ...;
    ResNet: in_chans)."""
    check_arch(arch)
    return build_vit(arch, **kwargs) if arch in ARCHS else build_resnet(arch, **kwargs)
