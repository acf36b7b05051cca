"""Distillation losses as pure functions on logits (no modules, no state).

Shapes: logits (N, V) or (B, T, V); `mask` (same leading dims) selects the positions that
count, and every loss is the mean over those positions. The teacher side may be full logits
over the vocabulary or the log-probabilities of its top-k tokens (offline cache): both are
renormalized with a log-softmax over the last dimension, so the divergences are taken over
whatever support the caller passes (the whole vocabulary, or the teacher's top-k with the
student's logits gathered at the same ids).

Conventions (those of Hinton et al. and MiniLLM / GKD):
- forward KL  KL(p_T || q_S): mass-covering; multiplied by T^2 so that its gradients keep
  the scale of the cross-entropy's when the temperature changes;
- reverse KL  KL(q_S || p_T): mode-seeking; also T^2-scaled;
- forward_kl_tail: forward KL, and against a top-k teacher over its k tokens plus one bucket for
  the rest of the vocabulary (0 exactly when student = teacher; self-distillation's loss);
- generalized JSD(beta) = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta*p + (1-beta)*q;
  beta -> 0 behaves like forward KL / beta, beta -> 1 like reverse KL / (1 - beta), scaled by T^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "forward_kl_tail")


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per position, summed over the last dim; 0 * log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over masked positions."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return _masked_mean(_kl(log_p, log_q), mask) * t * t


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(student / T) || softmax(teacher / T)), mean over masked positions."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return _masked_mean(_kl(log_q, log_p), mask) * t * t


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                    temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q (p teacher, q student)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    # log m = logsumexp(log p + log beta, log q + log(1 - beta)), stable where p or q underflow.
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    per_position = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return _masked_mean(per_position, mask) * t * t


def divergence(kind: str, student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               beta: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """One of DIVERGENCES by name."""
    if kind in ("forward_kl", "forward_kl_tail"):  # over the whole vocabulary there is no tail bucket
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature, mask)
    raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")


def next_token_ce(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of logits (..., V) against labels (...), mean over masked positions."""
    per_position = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   reduction="none").reshape(labels.shape)
    return _masked_mean(per_position, mask)


def mix(ce: Tensor, kd: Tensor, kd_weight: float) -> Tensor:
    """(1 - w) * CE + w * KD: w = 0 is plain language-model training, w = 1 pure distillation."""
    return (1.0 - kd_weight) * ce + kd_weight * kd


def hidden_state_loss(student_hidden: Tensor, teacher_hidden: Tensor, projection: torch.nn.Module | None = None,
                      mask: Tensor | None = None) -> Tensor:
    """Mean squared error between (projected) student and teacher hidden states (..., D), per
    position normalized by the teacher's mean square so that layers of different scales weigh
    alike. `projection` (a learned Linear) maps the student width to the teacher's when they differ."""
    s = student_hidden.float()
    if projection is not None:
        s = projection(s)
    tch = teacher_hidden.float()
    if s.shape[-1] != tch.shape[-1]:
        raise ValueError(f"hidden widths differ ({s.shape[-1]} vs {tch.shape[-1]}); pass a projection")
    per_position = (s - tch).pow(2).mean(-1) / tch.pow(2).mean(-1).clamp_min(1e-6)
    return _masked_mean(per_position, mask)


def sparse_forward_kl(student_logits: Tensor, top_ids: Tensor, teacher_top_logprobs: Tensor,
                      temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Forward KL against a top-k teacher: the teacher renormalized over its k tokens, the student's
    log-probs over the *whole* vocabulary at those ids, so mass the student puts outside the
    teacher's top-k is penalized too. T^2-scaled; equals `forward_kl` when k is the vocabulary."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_ids.long())
    log_p = F.log_softmax(teacher_top_logprobs.float() / t, dim=-1)
    p = log_p.exp()
    per_position = (p * (log_p - log_q)).sum(-1)
    return _masked_mean(per_position, mask) * t * t


def sparse_forward_kl_tail(student_logits: Tensor, top_ids: Tensor, teacher_top_logprobs: Tensor,
                           mask: Tensor | None = None) -> Tensor:
    """Forward KL over the teacher's top-k tokens plus one bucket for all the others: the teacher's
    k log-probs as cached (over the whole vocabulary, not renormalized) and its remaining mass, the
    student's log-probs at the same ids and its remaining mass. Unlike `sparse_forward_kl`, whose
    renormalized target pulls the student towards a sharper distribution than the teacher's, this
    is 0 exactly when the student equals the teacher: the loss for a student that must reproduce
    its own original (self-distillation). Temperature 1 (the cache's)."""
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, top_ids.long())  # (..., k)
    log_p = teacher_top_logprobs.float()
    p = log_p.exp()
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - log_q.exp().sum(-1)).clamp_min(1e-12)
    head = (p * (log_p - log_q)).sum(-1)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return _masked_mean(head + tail, mask)


def sparse_teacher_view(student_logits: Tensor, top_ids: Tensor) -> Tensor:
    """The student's logits at the teacher's top-k ids (..., k): the support of an offline loss."""
    return student_logits.gather(-1, top_ids.long())
