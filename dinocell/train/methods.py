"""The self-supervised methods the trainer runs (`method` in the config), behind one small interface.

The training step, the loop, checkpoints and evaluation only use what `SSLMethod` declares, so a method is one
module: dinocell.train.meta_arch (dino: DINO + iBOT + KoLeo, student and EMA teacher) and dinocell.train.simclr
(simclr: NT-Xent on two views).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from dinocell.config.schema import SSLConfig
from dinocell.models.vision_transformer import DinoVisionTransformer
from dinocell.train.meta_arch import SSLMetaArch, SSLOutput
from dinocell.train.simclr import SimCLRMetaArch


class SSLMethod(Protocol):
    """What the trainer needs from a method (an nn.Module; its state_dict is the checkpoint's "model")."""

    student: nn.Module  # the network the optimiser trains; `student.backbone` is its backbone
    SCHEDULED_INPUTS: tuple[str, ...]  # scheduled values (dinocell.train.schedules) `forward` takes by name

    def __call__(self, batch, **scheduled: float) -> SSLOutput:
        """The loss of one batch; no side effect on the model's state (a skipped step needs no rollback)."""

    def after_step(
        self, values: Mapping[str, float], updates: dict[str, torch.Tensor], taken: torch.Tensor | None = None
    ) -> None:
        """Commit what follows the optimiser step (DINO: teacher EMA and centers), from the iteration's scheduled
        values and the forwards' `updates` (batch sums) added up over the micro-batches. `taken` None: the step was
        taken; a bool tensor on the device: commit only where it is True, selected on the device (no host read)."""

    def eval_backbone(self) -> nn.Module:
        """The backbone whose features are evaluated (DINO: the teacher's; SimCLR: the student's), whole on every rank:
        evaluations run it on each rank's share of the samples. Every rank must call it (a sharded model is
        gathered)."""

    def eval_dump(self) -> dict[str, dict[str, torch.Tensor]]:
        """{role: state dict} written to output_dir/eval/<iteration>/<role>_checkpoint.pth. Every rank must call it;
        the state dict is complete on rank 0."""


METHODS: dict[str, type[nn.Module]] = {"dino": SSLMetaArch, "simclr": SimCLRMetaArch}


def build_method(cfg: SSLConfig) -> SSLMethod:
    """The meta-architecture of `cfg.method`, built from the config (weights initialised, nothing moved to a device),
    with the backbone speed switches applied: train.activation_checkpointing on the student's blocks (the teacher
    runs without gradients, where there is nothing to recompute) and train.compile on the blocks of every backbone
    (student and teacher; torch.compile compiles lazily, at the first forward on the device)."""
    model = METHODS[cfg.method](cfg)
    if cfg.train.activation_checkpointing:  # both switches need a ViT (checked with the config)
        model.student.backbone.activation_checkpointing = True
    if cfg.train.compile:
        for module in model.modules():
            if isinstance(module, DinoVisionTransformer):
                module.compile_blocks()
    return model
