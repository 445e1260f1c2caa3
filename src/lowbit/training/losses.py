"""The losses of training-time compression, written as in the papers.

* `kd_loss` — Hinton et al. 2015 (and DistilBERT): ``α·T²·KL(p_T ‖ q_T) + (1−α)·CE(q, labels)``
  with ``p_T = softmax(z_teacher / T)`` and ``q_T = softmax(z_student / T)``; the ``T²`` keeps the
  soft term's gradient on the same scale as the hard one's when T changes. Averaged over the
  predicted tokens (positions 0..L-2 of every window predict the next id; label -100 is ignored).
* `hidden_loss` — the mean, over matched layers, of ``‖h_s − h_t‖² / ‖h_t‖²`` (a relative MSE, so
  layers with large activations do not dominate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError

IGNORE = -100


def _shifted(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions [N, V] of positions 0..L-2 and their targets [N] (the next ids)."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise LowbitError(f"logits must be [batch, len, vocab] matching tokens [batch, len]; got "
                          f"{tuple(logits.shape)} and {tuple(tokens.shape)}")
    return logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)


def ce_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy (mean over predicted tokens; label -100 ignored)."""
    z, y = _shifted(logits, tokens)
    return F.cross_entropy(z.float(), y, ignore_index=IGNORE)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, alpha: float = 1.0,
            temperature: float = 1.0) -> tuple[Tensor, dict]:
    """``α·T²·KL(p_T ‖ q_T) + (1−α)·CE`` (module docstring); returns (loss, {"kl": ..., "ce": ...})
    with the two terms as floats (KL at temperature T, CE at temperature 1)."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise LowbitError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise LowbitError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                          f"{tuple(teacher_logits.shape)}")
    zs, y = _shifted(student_logits, tokens)
    zt, _ = _shifted(teacher_logits, tokens)
    keep = y != IGNORE
    zs, zt = zs[keep].float(), zt[keep].float().detach()
    log_q = F.log_softmax(zs / temperature, dim=-1)
    log_p = F.log_softmax(zt / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    ce = F.cross_entropy(zs, y[keep]) if alpha < 1.0 else zs.new_zeros(())
    loss = alpha * temperature ** 2 * kl + (1.0 - alpha) * ce
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach())}


def hidden_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Mean over pairs of ``‖h_s − h_t‖² / ‖h_t‖²`` (teacher states detached)."""
    if len(student) != len(teacher) or not student:
        raise LowbitError(f"hidden-state matching needs as many student as teacher states, got {len(student)}, "
                          f"{len(teacher)}")
    terms = []
    for hs, ht in zip(student, teacher):
        ht = ht.detach().float()
        terms.append((hs.float() - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(1e-30))
    return torch.stack(terms).mean()
