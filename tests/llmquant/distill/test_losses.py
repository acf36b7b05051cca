"""Distillation losses against values computed by hand (natural logs)."""

from __future__ import annotations

import math

import pytest
import torch

from llmquant.distill import losses

# Two-token vocabulary: teacher p = (0.8, 0.2), student q = (0.5, 0.5), as logits.
P = torch.tensor([[math.log(0.8), math.log(0.2)]])
Q = torch.tensor([[0.0, 0.0]])


def test_forward_kl_by_hand():
    # KL(p || q) = 0.8 ln(0.8 / 0.5) + 0.2 ln(0.2 / 0.5)
    expected = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert losses.forward_kl(Q, P).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.192745, abs=1e-6)


def test_reverse_kl_by_hand():
    # KL(q || p) = 0.5 ln(0.5 / 0.8) + 0.5 ln(0.5 / 0.2)
    expected = 0.5 * math.log(0.625) + 0.5 * math.log(2.5)
    assert losses.reverse_kl(Q, P).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.223144, abs=1e-6)


def test_temperature_softens_and_scales_by_t_squared():
    # At T = 2 the teacher logits ln 0.8, ln 0.2 become p' = (sqrt .8, sqrt .2) / (sqrt .8 + sqrt .2) = (2/3, 1/3).
    p2 = (2 / 3, 1 / 3)
    expected = 4.0 * (p2[0] * math.log(p2[0] / 0.5) + p2[1] * math.log(p2[1] / 0.5))
    assert losses.forward_kl(Q, P, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_generalized_jsd_by_hand():
    beta = 0.3
    p, q = (0.8, 0.2), (0.5, 0.5)
    m = [beta * p[i] + (1 - beta) * q[i] for i in range(2)]  # (0.59, 0.41)
    kl_pm = sum(p[i] * math.log(p[i] / m[i]) for i in range(2))
    kl_qm = sum(q[i] * math.log(q[i] / m[i]) for i in range(2))
    expected = beta * kl_pm + (1 - beta) * kl_qm
    assert losses.generalized_jsd(Q, P, beta=beta).item() == pytest.approx(expected, rel=1e-5)
    # Symmetric at beta = 0.5, zero when the distributions agree.
    assert losses.generalized_jsd(Q, P, 0.5).item() == pytest.approx(losses.generalized_jsd(P, Q, 0.5).item(), rel=1e-6)
    assert losses.generalized_jsd(P, P, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_mask_averages_only_selected_positions():
    student = torch.stack([Q[0], P[0]])  # position 0 differs from the teacher, position 1 equals it
    teacher = torch.stack([P[0], P[0]])
    both = losses.forward_kl(student, teacher).item()
    first = losses.forward_kl(student, teacher, mask=torch.tensor([True, False])).item()
    assert first == pytest.approx(0.192745, abs=1e-6)
    assert both == pytest.approx(0.192745 / 2, abs=1e-6)


def test_cross_entropy_and_mix_by_hand():
    logits = torch.tensor([[[math.log(0.8), math.log(0.2)], [0.0, 0.0]]])  # (1, 2, V=2)
    labels = torch.tensor([[1, 0]])
    ce = losses.next_token_ce(logits, labels)
    assert ce.item() == pytest.approx((-math.log(0.2) - math.log(0.5)) / 2, rel=1e-6)
    kd = torch.tensor(0.5)
    assert losses.mix(ce, kd, 0.25).item() == pytest.approx(0.75 * ce.item() + 0.25 * 0.5, rel=1e-6)
    assert losses.mix(ce, kd, 0.0).item() == pytest.approx(ce.item())


def test_sparse_forward_kl_equals_full_when_k_is_the_vocabulary_and_penalizes_mass_outside():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    t_lp = torch.log_softmax(t, -1)
    values, ids = torch.topk(t_lp, 11, dim=-1)
    full = losses.forward_kl(s, t, temperature=1.5)
    assert losses.sparse_forward_kl(s, ids, values, temperature=1.5).item() == pytest.approx(full.item(), rel=1e-5)
    # Top-2: teacher p = (0.8, 0.2) over ids (0, 1); a student with half its mass on id 2 pays ln 2 more
    # than one with the same 0.8 : 0.2 split and no mass elsewhere.
    ids2, lp2 = torch.tensor([[0, 1]]), torch.tensor([[math.log(0.8), math.log(0.2)]])
    exact = torch.tensor([[math.log(0.8), math.log(0.2), -1e9]])
    leaky = torch.tensor([[math.log(0.4), math.log(0.1), math.log(0.5)]])
    assert losses.sparse_forward_kl(exact, ids2, lp2).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.sparse_forward_kl(leaky, ids2, lp2).item() == pytest.approx(math.log(2), rel=1e-5)


def test_hidden_state_loss_with_projection():
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[2.0, 0.0, 2.0]])
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))  # maps s to t exactly
    assert losses.hidden_state_loss(s, t, proj).item() == pytest.approx(0.0, abs=1e-7)
    # Without the projection's second row the middle coordinate is off by 0 and the last by 1:
    # mean squared error (0 + 0 + 1) / 3 over the teacher's mean square (4 + 0 + 4) / 3 = 1/8.
    with torch.no_grad():
        proj.weight[2, 1] = 0.5
    assert losses.hidden_state_loss(s, t, proj).item() == pytest.approx(1 / 8, rel=1e-6)
    with pytest.raises(ValueError, match="widths differ"):
        losses.hidden_state_loss(s, t)


def test_gradients_are_finite_with_padded_top_k_slots():
    from llmquant.distill.teacher_cache import PAD_LOGPROB

    s = torch.randn(2, 4, requires_grad=True)
    lp = torch.tensor([[-0.1, -2.5, PAD_LOGPROB], [-0.3, PAD_LOGPROB, PAD_LOGPROB]])
    ids = torch.tensor([[0, 1, 0], [2, 0, 0]])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        view = losses.sparse_teacher_view(s, ids).masked_fill(lp <= PAD_LOGPROB / 2, PAD_LOGPROB)
        loss = losses.divergence(kind, view, lp)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), kind
