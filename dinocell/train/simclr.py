"""SimCLR meta-architecture (method simclr): one network, two views per image, NT-Xent; no teacher, no EMA.

The two views are the batch's two global crops (crop groups global1 and global2, crops.local_crops_number = 0). They
go through the backbone and the projection head as ONE batch of 2B images, so BatchNorm normalises both views with the
same statistics (with per-view batches a network can tell the views apart by their statistics, a known shortcut).
With several CUDA processes and `simclr.sync_batchnorm` the statistics cover the global batch (SyncBatchNorm, as
SimCLR's global BN); PyTorch's SyncBatchNorm has no CPU implementation, so with gloo each process normalises over
its own 2B views. NT-Xent's negatives always come from the global batch (dinocell.loss.nt_xent gathers them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from dinocell import distributed
from dinocell.config.schema import SSLConfig
from dinocell.layers.projection_head import ProjectionHead
from dinocell.loss import nt_xent_loss
from dinocell.models import build_backbone, load_pretrained
from dinocell.pipeline.batch import SSLBatch
from dinocell.train.meta_arch import SSLOutput

logger = logging.getLogger("dinocell")


class SimCLRNetwork(nn.Module):
    """Backbone + projection head: images [N, C, H, W] -> projections [N, head_out_dim]."""

    def __init__(self, backbone: nn.Module, projection_head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone.forward_features(images)["x_norm_clstoken"])


class SimCLRMetaArch(nn.Module):
    """The SimCLR student. `forward` computes the NT-Xent loss of a batch; nothing happens after a step."""

    SCHEDULED_INPUTS: tuple[str, ...] = ()  # no scheduled value enters the loss

    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        backbone = build_backbone(cfg.student.arch, **cfg.student.backbone_kwargs())
        if cfg.student.pretrained_weights:
            report = load_pretrained(backbone, cfg.student.pretrained_weights, strict=True)
            logger.info("backbone initialised from %s: %s", cfg.student.pretrained_weights, report)
        s = cfg.simclr
        head = ProjectionHead(
            backbone.embed_dim, out_dim=s.head_out_dim, hidden_dim=s.head_hidden_dim, nlayers=s.head_nlayers,
            batchnorm=s.head_batchnorm,
        )
        self.student = SimCLRNetwork(backbone, head)
        self.temperature = s.temperature
        has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.student.modules())
        if s.sync_batchnorm and has_batchnorm and distributed.is_enabled():
            if torch.cuda.is_available():
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            else:
                logger.warning("simclr.sync_batchnorm: SyncBatchNorm needs CUDA; with gloo on CPU each process "
                               "normalises its own views (per-process BatchNorm statistics)")

    def eval_backbone(self) -> nn.Module:
        """The backbone whose features are evaluated: the student's (SimCLR has no other)."""
        return self.student.backbone

    def after_step(
        self, values: Mapping[str, float], updates: dict[str, torch.Tensor], taken: torch.Tensor | None = None
    ) -> None:
        """Nothing to do: SimCLR has no teacher and no running targets."""

    def eval_dump(self) -> dict[str, dict[str, torch.Tensor]]:
        """The eval dump's contents: {"student": {backbone.*, projection_head.*}}."""
        return {"student": {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}}

    def forward(self, batch: SSLBatch) -> SSLOutput:
        """NT-Xent of the two views (global crop 0 of every image vs global crop 1)."""
        if batch.n_global_crops != 2 or batch.n_local_crops != 0:
            raise ValueError(
                f"SimCLR takes 2 views per image (2 global crops, no local crops), got {batch.n_global_crops} global "
                f"and {batch.n_local_crops} local crops; set crops.local_crops_number=0"
            )
        z = self.student(batch.global_crops)  # [2B, D]: all first views, then all second views
        view1, view2 = z.chunk(2)
        loss = nt_xent_loss(view1, view2, self.temperature)
        return SSLOutput(loss, {"nt_xent_loss": loss.detach()}, {})
