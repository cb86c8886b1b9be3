"""Student/teacher meta-architecture: DINO (cls) + iBOT (masked patches) + KoLeo, teacher = EMA of the student.

Loss combination follows DINOv3's SSLMetaArch: the student sees all crops in one list forward (global crops with
their iBOT masks), the teacher only the unmasked global crops. With S global and L local crops the DINO terms are
weighted by their share of (student, teacher) pairs, global = S(S-1) (S^2 without ignore_diagonal) and local = S*L,
both times `dino.loss_weight`; KoLeo is averaged over the global crops and weighted by S * `dino.koleo_loss_weight`;
iBOT by `ibot.loss_weight`.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed.nn.functional as dist_fn
from omegaconf import DictConfig
from torch import nn

from dinocell import distributed
from dinocell.layers.dino_head import DINOHead
from dinocell.loss import dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp, softmax_center, update_center
from dinocell.models import build_backbone, load_pretrained

logger = logging.getLogger("dinocell")
N_GLOBAL_CROPS = 2
CENTER_MOMENTUM = 0.9  # EMA of the teacher-logit center (train.centering=centering), as in DINO/DINOv2


def build_student_backbone(cfg: DictConfig) -> nn.Module:
    s = cfg.student
    return build_backbone(
        s.arch,
        patch_size=s.patch_size,
        in_chans=s.in_chans,
        n_storage_tokens=s.n_storage_tokens,
        drop_path_rate=s.drop_path_rate,
        layerscale_init=s.layerscale,
        pos_embed_rope_shift_coords=s.pos_embed_rope_shift_coords,
        pos_embed_rope_jitter_coords=s.pos_embed_rope_jitter_coords,
        pos_embed_rope_rescale_coords=s.pos_embed_rope_rescale_coords,
    )


def _head(in_dim: int, head_cfg: DictConfig) -> DINOHead:
    return DINOHead(
        in_dim,
        out_dim=head_cfg.head_n_prototypes,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
        nlayers=head_cfg.head_nlayers,
    )


class StudentNetwork(nn.Module):
    """Backbone + DINO head + iBOT head. One `forward` computes everything the losses need from the student, so a
    single DistributedDataParallel wrapper around it overlaps the gradient all-reduce with backward.

    The iBOT head runs even on zero masked patches (an empty batch): every parameter then takes part in every step,
    which DDP requires, and every rank issues the same collectives.
    """

    def __init__(self, backbone: nn.Module, dino_head: DINOHead, ibot_head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head  # may be dino_head itself (ibot.separate_head=false)

    def forward(
        self, crops: list[torch.Tensor], masks: list[torch.Tensor | None], mask_indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """crops: [global crops, local crops?] crop-major batches; mask_indices: flat masked patches of the globals.

        Returns global_cls (pre-head cls tokens of the global crops, for KoLeo), cls_logits (DINO head on the cls
        tokens of all crops, globals first) and patch_logits (iBOT head on the masked patch tokens, [M, K]).
        """
        outs = self.backbone.forward_features(crops, masks=masks)
        patches = outs[0]["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        return {
            "global_cls": outs[0]["x_norm_clstoken"],
            "cls_logits": self.dino_head(torch.cat([o["x_norm_clstoken"] for o in outs])),
            "patch_logits": self.ibot_head(patches),
        }


class SSLMetaArch(nn.Module):
    """Holds student and teacher; `forward` returns the weighted total loss and the detached loss terms."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = build_student_backbone(cfg)
        if cfg.student.pretrained_weights:
            report = load_pretrained(backbone, cfg.student.pretrained_weights, strict=True)
            logger.info("student and teacher backbones initialised from %s: %s", cfg.student.pretrained_weights, report)
        dino_head = _head(backbone.embed_dim, cfg.dino)
        ibot_head = _head(backbone.embed_dim, cfg.ibot) if cfg.ibot.separate_head else dino_head
        self.student = StudentNetwork(backbone, dino_head, ibot_head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # EMA centers of the teacher logits; only used with train.centering=centering, always saved for resume.
        self.register_buffer("dino_center", torch.zeros(1, cfg.dino.head_n_prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, cfg.ibot.head_n_prototypes))

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no drop path, no RoPE augmentation)
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        student = list(self.student.parameters())
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """Teacher weights as in an eval dump: keys backbone.*, dino_head.*, ibot_head.*."""
        return {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}

    def _targets(self, logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        if self.cfg.train.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, teacher_temp)
        probs = softmax_center(logits, center, teacher_temp)
        center.copy_(update_center(center, logits, CENTER_MOMENTUM))
        return probs

    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: torch.Tensor, mask_indices: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.teacher.backbone.forward_features(global_crops)
        cls_logits = self.teacher.dino_head(out["x_norm_clstoken"])
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        patch_logits = self.teacher.ibot_head(patches)
        cls_probs = self._targets(cls_logits, self.dino_center, teacher_temp)
        # also with no masked patch on this rank: the targets' all-reduces must run on every rank
        patch_probs = self._targets(patch_logits, self.ibot_center, teacher_temp)
        return cls_probs.unflatten(0, (N_GLOBAL_CROPS, -1)), patch_probs

    def _koleo(self, cls_pre_head: torch.Tensor) -> torch.Tensor:
        """KoLeo per global crop ([S, B, D]), averaged; neighbours searched over the global batch when distributed."""
        eps = 1e-8
        if not (self.cfg.dino.koleo_loss_distributed and distributed.is_enabled()):
            return torch.stack([koleo_loss(x, eps) for x in cls_pre_head]).mean()
        # one autograd all-gather for all crops: neighbours on other ranks receive their share of the gradient
        gathered = torch.cat(dist_fn.all_gather(cls_pre_head.contiguous()), dim=1)  # [S, W*B, D], rank-major
        offset = distributed.get_rank() * cls_pre_head.shape[1]
        losses = [koleo_loss(x, eps, candidates=pool, offset=offset) for x, pool in zip(cls_pre_head, gathered)]
        return torch.stack(losses).mean()

    def forward(
        self, batch: dict[str, torch.Tensor], teacher_temp: float, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total loss and the detached loss terms of one batch.

        `student` is the module to run for the student: `self.student` (default) or its DistributedDataParallel
        wrapper, which the trainer creates when several processes train together.
        """
        cfg = self.cfg
        student = self.student if student is None else student
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch["collated_masks"]
        mask_indices = batch["mask_indices_list"]
        n_local = cfg.crops.local_crops_number
        b = global_crops.shape[0] // N_GLOBAL_CROPS

        teacher_cls, teacher_patches = self._teacher_targets(global_crops, mask_indices, teacher_temp)

        crops, crop_masks = [global_crops], [masks]
        if n_local > 0:
            crops.append(local_crops)
            crop_masks.append(None)
        out = student(crops, crop_masks, mask_indices)
        global_cls, cls_logits = out["global_cls"], out["cls_logits"]
        global_logits = cls_logits[: N_GLOBAL_CROPS * b].unflatten(0, (N_GLOBAL_CROPS, b))
        student_temp = 0.1

        global_terms = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) if cfg.dino.global_ignore_diagonal else N_GLOBAL_CROPS**2
        local_terms = N_GLOBAL_CROPS * n_local
        terms: dict[str, torch.Tensor] = {}
        terms["dino_global_crops_loss"] = dino_loss(
            global_logits, teacher_cls, student_temp, ignore_diagonal=cfg.dino.global_ignore_diagonal
        )
        total = cfg.dino.loss_weight * global_terms / (global_terms + local_terms) * terms["dino_global_crops_loss"]
        if n_local > 0:
            local_logits = cls_logits[N_GLOBAL_CROPS * b :].unflatten(0, (n_local, b))
            terms["dino_local_crops_loss"] = dino_loss(local_logits, teacher_cls, student_temp)
            total = total + cfg.dino.loss_weight * local_terms / (global_terms + local_terms) * terms[
                "dino_local_crops_loss"
            ]
        else:
            terms["dino_local_crops_loss"] = torch.zeros((), device=total.device)

        terms["koleo_loss"] = self._koleo(global_cls.unflatten(0, (N_GLOBAL_CROPS, b)))
        total = total + cfg.dino.koleo_loss_weight * N_GLOBAL_CROPS * terms["koleo_loss"]

        # an empty mask (no masked patch in this local batch) gives a zero that keeps the graph
        terms["ibot_loss"] = ibot_loss(out["patch_logits"], teacher_patches, masks, student_temp)
        total = total + cfg.ibot.loss_weight * terms["ibot_loss"]
        return total, {name: value.detach() for name, value in terms.items()}
