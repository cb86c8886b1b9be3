"""iBOT loss: the student predicts, for each masked patch of a global crop, the teacher's target for that patch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ibot_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Masked-patch cross-entropy: per crop the mean over its masked patches, summed over crops, divided by B.

    student_logits and teacher_probs are [M, K], one row per True entry of `masks` [B, N] in row-major order
    (the order of `mask_indices_list` from the collate). Dividing by B = masks.shape[0] (all crops, masked or not)
    rather than by the number of masked crops is the DINOv2/v3 definition: the loss scales with the masked share.
    Computed in fp32 outside autocast.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool [B, N], got {masks.dtype} with shape {tuple(masks.shape)}")
    n_masked = int(masks.sum())
    if student_logits.shape != teacher_probs.shape or student_logits.ndim != 2 or student_logits.shape[0] != n_masked:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} must both "
            f"be [M, K] with M = {n_masked}, the number of True entries in masks"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        per_crop = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # [B]
        weights = per_crop.unsqueeze(-1).expand_as(masks)[masks]  # [M], in mask order
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        per_patch = torch.sum(teacher_probs.float() * log_p, dim=-1)  # [M]
        return -(per_patch * weights).sum() / masks.shape[0]
