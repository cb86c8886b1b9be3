"""ResNet-18/50/101 backbones (torchvision's architecture) with any number of input channels, for SimCLR.

Parameter names are torchvision's (`conv1`, `bn1`, `layer1..4`; no `fc`), so torchvision's ImageNet files load as they
are (their classifier `fc.*` is dropped by load_pretrained). The backbone offers the ViT interface where it has a
meaning: `forward(x)` is the global feature [B, D] (average pool of the last stage), `forward_features(x)` a dict whose
`x_norm_clstoken` is that pooled feature (the family-wide key for "the image feature"), `embed_dim` its width.
ResNets have no patch, storage or mask tokens and no attention: there is no `x_norm_patchtokens`,
`get_intermediate_layers` or `get_last_self_attention`; `x_feature_map` [B, D, H/32, W/32] is their spatial output.
"""

from __future__ import annotations

from itertools import groupby

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# block type and blocks per stage (torchvision's resnet18/50/101)
RESNET_ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNetBackbone(ResNet):
    """torchvision ResNet without its classifier, `in_chans` input channels, the backbone interface of dinocell."""

    def __init__(self, arch: str, *, in_chans: int = 3) -> None:
        if arch not in RESNET_ARCHS:
            raise ValueError(f"unknown ResNet arch {arch!r}; expected one of {sorted(RESNET_ARCHS)}")
        if in_chans < 1:
            raise ValueError(f"need in_chans >= 1, got {in_chans}")
        block, layers = RESNET_ARCHS[arch]
        super().__init__(block, list(layers))
        self.arch, self.in_chans = arch, in_chans
        self.embed_dim: int = self.fc.in_features
        self.n_blocks = len(layers)  # stages layer1..4: the depth unit of layer-wise lr decay (the stem is layer 0)
        self.fc = nn.Identity()  # no classifier: the pooled feature is the output
        if in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.arch}: expected images [B, {self.in_chans}, H, W] ({self.in_chans} input channels, in_chans), "
                f"got shape {list(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(
        self, x: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | list[torch.Tensor | None] | None = None
    ) -> dict[str, torch.Tensor | None] | list[dict[str, torch.Tensor | None]]:
        """One batch -> dict; a list of batches -> list of dicts. Consecutive batches of the same shape run as one
        batch, so BatchNorm statistics in training cover all of them (as DINO's multi-crop wrapper does).

        Keys: x_norm_clstoken [B, D] (pooled feature), x_feature_map [B, D, h, w], masks (always None: a ResNet has
        no patch tokens to mask)."""
        if isinstance(x, torch.Tensor):
            return self.forward_features([x], [masks])[0]
        if masks is not None and (len(masks) != len(x) or any(m is not None for m in masks)):
            raise ValueError(
                f"{self.arch} has no patch tokens, so it takes no iBOT masks (got {len(masks)} for {len(x)} batches, "
                f"{sum(m is not None for m in masks)} not None); use a ViT backbone for masked-patch objectives"
            )
        outputs = []
        for _, group in groupby(x, key=lambda batch: batch.shape[1:]):
            batches = list(group)
            feature_map = self._feature_map(torch.cat(batches) if len(batches) > 1 else batches[0])
            for part in feature_map.split([b.shape[0] for b in batches]):
                pooled = torch.flatten(self.avgpool(part), 1)
                outputs.append({"x_norm_clstoken": pooled, "x_feature_map": part, "masks": None})
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature [B, D] (the global image feature)."""
        return torch.flatten(self.avgpool(self._feature_map(x)), 1)


def build_resnet(arch: str, **kwargs) -> ResNetBackbone:
    """A ResNet backbone; `in_chans` is its only option (the ViT options have no meaning for it)."""
    other = sorted(set(kwargs) - {"in_chans"})
    if other:
        raise ValueError(
            f"{arch} takes only in_chans, got also {other}: these are ViT options (a ResNet has no patches, tokens "
            f"or RoPE); build it with build_backbone({arch!r}, in_chans=C)"
        )
    return ResNetBackbone(arch, **kwargs)
