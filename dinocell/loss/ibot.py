"""iBOT loss: the student predicts, for each masked patch of a global crop, the teacher's target for that patch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ibot_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    mask_weights: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Masked-patch cross-entropy: per crop the mean over its masked patches, summed over crops, divided by n_crops.

    student_logits and teacher_probs are [M, K], one row per masked patch (the True entries of the crops' bool
    masks [n_crops, N], row-major); mask_weights [M] is 1 / (masked patches of that row's crop), which the collate
    precomputes (SSLBatch.mask_weights) so that no count has to come back from the GPU. Dividing by n_crops (all
    global crops, masked or not) rather than by the masked ones is the DINOv2/v3 definition: the loss scales with
    the masked share. Computed in fp32 outside autocast.
    """
    if student_logits.shape != teacher_probs.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} must both "
            "be [M, K] (one row per masked patch)"
        )
    if mask_weights.shape != student_logits.shape[:1]:
        raise ValueError(f"mask_weights {tuple(mask_weights.shape)} must be [M] = [{student_logits.shape[0]}]")
    if n_crops < 1:
        raise ValueError(f"n_crops={n_crops}: expected the number of global crops in the batch (>= 1)")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        per_patch = torch.sum(teacher_probs.float() * log_p, dim=-1)  # [M]
        return -(per_patch * mask_weights.float()).sum() / n_crops
