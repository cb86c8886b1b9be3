"""AdamW with DINO-style parameter groups (the lr scaling rule is OptimConfig.scaled_lr).

Parameter groups (one per distinct combination, so the optimiser stays small):
- layer-wise lr decay: patch embedding, tokens (cls, storage, mask) and RoPE are layer 0, block i is layer i + 1,
  the final norm and the heads are layer n_blocks + 1; lr multiplier = layerwise_decay ** (n_blocks + 1 - layer).
  ResNets count stages instead of blocks: the stem (conv1, bn1) is layer 0, stage layerK is layer K, n_blocks = 4;
- the patch embedding gets an extra `patch_embed_lr_mult`;
- no weight decay on biases, norm weights, LayerScale gammas and the learned tokens (1-D or token tensors: decaying
  them towards zero only hurts);
- the heads' `last_layer` follows the last-layer lr schedule (zero while frozen).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from dinocell.config.schema import OptimConfig

_TOKEN_NAMES = ("cls_token", "storage_tokens", "mask_token", "register_tokens")


def _backbone_layer_id(name: str, n_blocks: int) -> int:
    if name.startswith(("patch_embed.", "rope_embed.", "conv1.", "bn1.")) or name in _TOKEN_NAMES:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if stage := re.match(r"layer(\d+)\.", name):  # ResNet stage
        return int(stage.group(1))
    return n_blocks + 1


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in _TOKEN_NAMES


def param_groups(
    student: nn.Module, *, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float
) -> list[dict]:
    """Groups for torch.optim.AdamW; each carries `lr_multiplier`, `wd_multiplier` and `is_last_layer`."""
    groups: dict[tuple[float, float, bool], dict] = {}
    seen: set[int] = set()  # a head shared by DINO and iBOT (ibot.separate_head=false) appears twice
    for module_name, module in student.named_children():
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if module_name == "backbone":
                layer = _backbone_layer_id(name, n_blocks)
                lr_mult = layerwise_decay ** (n_blocks + 1 - layer)
                if name.startswith("patch_embed."):
                    lr_mult *= patch_embed_lr_mult
            else:
                lr_mult = 1.0
            wd_mult = 0.0 if _no_weight_decay(name, param) else 1.0
            is_last_layer = name.startswith("last_layer.")
            key = (lr_mult, wd_mult, is_last_layer)
            group = groups.setdefault(
                key,
                {"params": [], "names": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                 "is_last_layer": is_last_layer},
            )
            group["params"].append(param)
            group["names"].append(f"{module_name}.{name}")
    return list(groups.values())


def build_optimizer(groups: Iterable[dict], optim: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `groups`. `fused=True` (the trainer's choice on CUDA): one kernel for all parameters, which also
    skips a step on the device when given `found_inf` (dinocell.train.step); otherwise torch's default
    implementation (on CPU the per-parameter loop, the tested reference)."""
    # lr and weight decay are overwritten every iteration by apply_schedule; 0 here only satisfies the constructor.
    betas = (optim.adamw_beta1, optim.adamw_beta2)
    return torch.optim.AdamW(list(groups), lr=0.0, weight_decay=0.0, betas=betas, **({"fused": True} if fused else {}))


def apply_schedule(
    optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float, last_layer_lr: float | None = None
) -> None:
    """Set every group's lr and weight decay; `last_layer_lr` is needed only when a group holds a head's last layer."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
