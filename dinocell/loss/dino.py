"""DINO loss: cross-entropy between teacher probabilities and student predictions on the cls token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> torch.Tensor:
    """Mean over (student crop s, teacher crop t, image b) of -sum_k teacher_probs[t,b,k] * log_softmax(s/temp)[s,b,k].

    student_logits [S, B, K] and teacher_probs [T, B, K] are crop-major (crop index first). With `ignore_diagonal`
    the pairs s == t (the same global crop seen by student and teacher) are left out of the sum and of the count,
    which is then B * (S * T - min(S, T)). Computed in fp32 outside autocast.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            f"expected student_logits [S, B, K] and teacher_probs [T, B, K], got shapes "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(
            f"batch and prototype sizes differ: student {tuple(student_logits.shape)} vs "
            f"teacher {tuple(teacher_probs.shape)}; both must be [crops, B, K] with the same B and K"
        )
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    n_pairs = n_student * n_teacher - (min(n_student, n_teacher) if ignore_diagonal else 0)
    if n_pairs * batch == 0:
        raise ValueError(
            f"no (student crop, teacher crop, image) pairs: S={n_student}, T={n_teacher}, B={batch}, "
            f"ignore_diagonal={ignore_diagonal}; skip this term instead (e.g. when there are no local crops)"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        if not ignore_diagonal:
            return -torch.einsum("sbk,tbk->", log_p, teacher_probs.float()) / (batch * n_pairs)
        cross = -torch.einsum("sbk,tbk->st", log_p, teacher_probs.float())  # per crop pair, summed over b and k
        same_crop = torch.eye(n_student, n_teacher, dtype=torch.bool, device=cross.device)
        return cross.masked_fill(same_crop, 0.0).sum() / (batch * n_pairs)
