"""Loss functions of self-supervised training: pure functions of tensors, no state (the trainer keeps centers)."""

from dinocell.loss.centering import logit_sum, sinkhorn_knopp, softmax_center, update_center
from dinocell.loss.dino import dino_loss
from dinocell.loss.ibot import ibot_loss
from dinocell.loss.koleo import koleo_loss
from dinocell.loss.nt_xent import nt_xent_loss

__all__ = [
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "logit_sum",
    "nt_xent_loss",
    "sinkhorn_knopp",
    "softmax_center",
    "update_center",
]
