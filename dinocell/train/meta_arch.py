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
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn

from dinocell import distributed, parallel
from dinocell.config.schema import DinoConfig, IBotConfig, SSLConfig
from dinocell.layers.dino_head import DINOHead
from dinocell.loss import dino_loss, ibot_loss, koleo_loss, logit_sum, sinkhorn_knopp, softmax_center, update_center
from dinocell.models import build_backbone, load_pretrained
from dinocell.pipeline.batch import SSLBatch

logger = logging.getLogger("dinocell")
CENTER_MOMENTUM = 0.9  # EMA of the teacher-logit center (train.centering=centering), as in DINO/DINOv2
STUDENT_TEMP = 0.1


class SSLOutput(NamedTuple):
    """What one forward gives the training step (both methods; see dinocell.train.methods)."""

    loss: torch.Tensor  # weighted total loss of this rank's batch
    terms: dict[str, torch.Tensor]  # detached loss terms, for metrics
    # batch statistics that sum over micro-batches, used by after_step once the step is committed (DINO: teacher-logit
    # sums and counts of the EMA centers)
    updates: dict[str, torch.Tensor]


def _head(in_dim: int, head_cfg: DinoConfig | IBotConfig) -> DINOHead:
    return DINOHead(
        in_dim,
        out_dim=head_cfg.head_n_prototypes,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
        nlayers=head_cfg.head_nlayers,
    )


class StudentNetwork(nn.Module):
    """Backbone + DINO head + iBOT head. One `forward` computes everything the losses need from the student.

    The iBOT head runs even on zero masked patches (an empty batch): every parameter then takes part in every step,
    which DistributedDataParallel requires, and every rank issues the same collectives.
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
    """Student and teacher (method dino). `forward` computes the loss of a batch and has no side effects on the model's
    state; `after_step` applies the teacher's EMA and the centers' updates once the optimiser step is taken.

    Several processes wrap the whole module in DistributedDataParallel (only the student's parameters require
    gradients, so only they are averaged), or shard it with FSDP2 along `fsdp_units` (dinocell.parallel).
    """

    SCHEDULED_INPUTS = ("teacher_temp",)  # scheduled values `forward` takes

    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        if not cfg.student.is_vit:
            raise ValueError(
                f"student.arch={cfg.student.arch!r} with method=dino: DINO + iBOT needs a ViT (iBOT predicts masked "
                "patch tokens, which a ResNet does not have); use method=simclr with a ResNet, or a vit_* arch"
            )
        self.cfg = cfg
        backbone = build_backbone(cfg.student.arch, **cfg.student.backbone_kwargs())
        if cfg.student.pretrained_weights and next(backbone.parameters()).device.type != "meta":  # FSDP fills it
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

    def fsdp_units(self) -> list[nn.Module]:
        """What FSDP shards as units, innermost first: each backbone block, the heads, then each backbone (its
        embeddings, tokens and norm), for the student and the teacher alike, so that the EMA update pairs local
        shards."""
        units: list[nn.Module] = []
        for net in (self.student, self.teacher):
            heads = [net.dino_head] if net.ibot_head is net.dino_head else [net.dino_head, net.ibot_head]
            units += [*getattr(net.backbone, "blocks", ()), *heads, net.backbone]
        return units

    def eval_backbone(self) -> nn.Module:
        """The backbone whose features are evaluated: the teacher's, as in DINO. Collective under FSDP (a whole copy
        is gathered on every rank, parallel.evaluation_copy)."""
        return parallel.evaluation_copy(
            self.teacher.backbone, lambda: build_backbone(self.cfg.student.arch, **self.cfg.student.backbone_kwargs())
        )

    @torch.no_grad()
    def after_step(
        self, values: Mapping[str, float], updates: dict[str, torch.Tensor], taken: torch.Tensor | None = None
    ) -> None:
        """After the optimiser step: the teacher's EMA at the scheduled momentum; with EMA centering, each center
        moves towards the step's mean teacher logit (`updates`: sums and counts over the step's batch). With `taken`
        (a bool tensor) both happen only where it is True, chosen on the device."""
        self.update_teacher(values["momentum"], taken)
        for head in ("dino", "ibot") if updates else ():
            center = getattr(self, f"{head}_center")
            total, count = updates[f"{head}_logit_sum"], updates[f"{head}_logit_count"]
            updated = update_center(center, total, count, CENTER_MOMENTUM)
            center.copy_(updated if taken is None else torch.where(taken, updated, center))

    @torch.no_grad()
    def update_teacher(self, momentum: float, taken: torch.Tensor | None = None) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, in a few multi-tensor kernels over all parameters
        (shard by shard under FSDP).

        With `taken` the momentum becomes a device scalar, 1 where the step was skipped: teacher * 1 + student * 0
        leaves the teacher exactly as it was (the skipped step left the student finite and unchanged)."""
        student = list(self.student.parameters())
        teacher = list(self.teacher.parameters())
        if taken is None:
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
            return
        keep = torch.where(taken, momentum, 1.0).to(teacher[0].dtype)
        torch._foreach_mul_(teacher, keep)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - keep))

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """Teacher weights as in an eval dump: keys backbone.*, dino_head.*, ibot_head.*. Under FSDP they are
        gathered from the shards: every rank must call it, and only rank 0 gets them ({} elsewhere)."""
        return parallel.full_state_dict(self.teacher)

    def eval_dump(self) -> dict[str, dict[str, torch.Tensor]]:
        """The eval dump's contents, DINOv3's layout: {"teacher": {backbone.*, dino_head.*, ibot_head.*}}. Every rank
        must call it (FSDP gathers the shards); ranks other than 0 get {"teacher": {}}."""
        return {"teacher": self.teacher_state_dict()}

    @torch.no_grad()
    def _teacher_targets(
        self, batch: SSLBatch, teacher_temp: float
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher probabilities of the global crops' cls tokens [S, B, K] and of the masked patches [M, K], and the
        logit statistics of the centers' update (EMA centering only)."""
        out = self.teacher.backbone.forward_features(batch.global_crops)
        cls_logits = self.teacher.dino_head(out["x_norm_clstoken"])
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch.mask_indices)
        # also with no masked patch on this rank: the targets' all-reduces must run on every rank
        patch_logits = self.teacher.ibot_head(patches)
        if self.cfg.train.centering == "sinkhorn_knopp":
            cls_probs = sinkhorn_knopp(cls_logits, teacher_temp)
            patch_probs = sinkhorn_knopp(patch_logits, teacher_temp)
            updates = {}
        else:
            cls_probs = softmax_center(cls_logits, self.dino_center, teacher_temp)
            patch_probs = softmax_center(patch_logits, self.ibot_center, teacher_temp)
            (dino_sum, dino_count), (ibot_sum, ibot_count) = logit_sum(cls_logits), logit_sum(patch_logits)
            updates = {"dino_logit_sum": dino_sum, "dino_logit_count": dino_count,
                       "ibot_logit_sum": ibot_sum, "ibot_logit_count": ibot_count}
        return cls_probs.unflatten(0, (batch.n_global_crops, -1)), patch_probs, updates

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

    def forward(self, batch: SSLBatch, teacher_temp: float) -> SSLOutput:
        """Weighted total loss, detached loss terms and the centers' logit statistics of one batch."""
        cfg = self.cfg
        n_global, n_local, b = batch.n_global_crops, batch.n_local_crops, batch.batch_size
        teacher_cls, teacher_patches, updates = self._teacher_targets(batch, teacher_temp)

        crops, crop_masks = [batch.global_crops], [batch.masks]
        if n_local > 0:
            crops.append(batch.local_crops)
            crop_masks.append(None)
        out = self.student(crops, crop_masks, batch.mask_indices)
        global_cls, cls_logits = out["global_cls"], out["cls_logits"]
        global_logits = cls_logits[: n_global * b].unflatten(0, (n_global, b))

        ignore_diagonal = cfg.dino.global_ignore_diagonal
        global_terms = n_global * (n_global - 1) if ignore_diagonal else n_global**2
        local_terms = n_global * n_local
        weight = cfg.dino.loss_weight
        terms: dict[str, torch.Tensor] = {}
        terms["dino_global_crops_loss"] = dino_loss(global_logits, teacher_cls, STUDENT_TEMP, ignore_diagonal)
        total = weight * global_terms / (global_terms + local_terms) * terms["dino_global_crops_loss"]
        if n_local > 0:
            local_logits = cls_logits[n_global * b :].unflatten(0, (n_local, b))
            terms["dino_local_crops_loss"] = dino_loss(local_logits, teacher_cls, STUDENT_TEMP)
            total = total + weight * local_terms / (global_terms + local_terms) * terms["dino_local_crops_loss"]
        else:
            terms["dino_local_crops_loss"] = torch.zeros((), device=total.device)

        terms["koleo_loss"] = self._koleo(global_cls.unflatten(0, (n_global, b)))
        total = total + cfg.dino.koleo_loss_weight * n_global * terms["koleo_loss"]

        # an empty mask (no masked patch in this local batch) gives a zero that keeps the graph
        terms["ibot_loss"] = ibot_loss(
            out["patch_logits"], teacher_patches, batch.mask_weights, n_global * b, STUDENT_TEMP
        )
        total = total + cfg.ibot.loss_weight * terms["ibot_loss"]
        return SSLOutput(total, {name: value.detach() for name, value in terms.items()}, updates)
