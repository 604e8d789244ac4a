"""Bradley-Terry reward-model loss (Eq. 18 of arXiv 2402.16030) and its LossType entry."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vcb_lib.losses import LossType, bradley_terry_loss

F64 = torch.float64


def reference(scores, labels, mask):
    """Python loops + math: mean over pairs (w, l) with label_w > label_l of log(1 + e^-(s_w - s_l))."""
    out = []
    for s, y, m in zip(scores, labels, mask):
        terms = [math.log1p(math.exp(-(s[w] - s[l]))) for w in range(len(s)) for l in range(len(s))
                 if m[w] and m[l] and y[w] > y[l]]
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return out


def test_chosen_rejected_pair_is_eq18():
    scores = torch.tensor([[1.5, -0.5], [0.0, 2.0]], dtype=F64)
    loss, metrics = bradley_terry_loss(scores, None, torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64))
    want = [-math.log(1 / (1 + math.exp(-2.0))), -math.log(1 / (1 + math.exp(2.0)))]
    torch.testing.assert_close(loss, torch.tensor(want, dtype=F64))
    assert metrics["rewards/accuracies"].item() == 0.5
    assert metrics["rewards/margins"].item() == pytest.approx(0.0)  # (2 - 2) / 2
    assert metrics["rewards/chosen"].item() == pytest.approx(0.75)
    assert not any(k.startswith("logps/") for k in metrics)


def test_matches_reference_with_ranks_ties_and_padding():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (6, 4), generator=g).to(F64)  # ties form no pair
    mask = torch.rand(6, 4, generator=g) < 0.8
    mask[0] = True
    mask[1] = False  # a prompt with no response
    got, _ = bradley_terry_loss(scores, None, labels, mask)
    torch.testing.assert_close(got, torch.tensor(reference(scores.tolist(), labels.tolist(), mask.tolist()), dtype=F64))


def test_no_pair_means_zero_loss_and_gradient():
    scores = torch.tensor([[0.3, -1.0], [2.0, 5.0]], dtype=F64, requires_grad=True)
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = bradley_terry_loss(scores, None, labels, mask)
    assert loss.tolist() == [0.0, 0.0]
    loss.sum().backward()
    assert (scores.grad == 0).all()


def test_gradient_is_sigmoid_of_negative_margin():
    scores = torch.tensor([[0.7, -0.2]], dtype=F64, requires_grad=True)
    bradley_terry_loss(scores, None, torch.tensor([[1.0, 0.0]], dtype=F64))[0].sum().backward()
    s = 1 / (1 + math.exp(0.9))  # σ(-(s_w - s_l))
    torch.testing.assert_close(scores.grad, torch.tensor([[-s, s]], dtype=F64))
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    labels = torch.tensor([[2.0, 1.0, 0.0]] * 3, dtype=F64)
    assert torch.autograd.gradcheck(lambda t: bradley_terry_loss(t, None, labels)[0], (x,))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=3, max_size=3), st.floats(-50, 50))
def test_shift_invariance(values, shift):
    """Only score differences matter: adding a constant to a prompt's scores changes nothing."""
    scores = torch.tensor([values], dtype=F64)
    labels = torch.tensor([[0.0, 2.0, 1.0]], dtype=F64)
    a, _ = bradley_terry_loss(scores, None, labels)
    b, _ = bradley_terry_loss(scores + shift, None, labels)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_padded_garbage_is_ignored():
    scores = torch.tensor([[1.0, 0.0, float("nan")]], dtype=F64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, float("inf")]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    loss, metrics = bradley_terry_loss(scores, None, labels, mask)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    loss.sum().backward()
    assert scores.grad[0, 2] == 0 and torch.isfinite(scores.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_loss_type_entry():
    lt = LossType.parse("BT")
    assert lt is LossType.BT and lt.value == "bt"
    assert lt.fn is bradley_terry_loss and lt.hparams == ()
    assert (lt.needs_reference, lt.uses_reward_values, lt.pairwise) == (False, False, True)
    assert list(inspect.signature(lt.fn).parameters)[:4] == ["policy_logps", "ref_logps", "rewards", "mask"]
    kwonly = [k for k, p in inspect.signature(lt.fn).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert kwonly == ["n_tokens"]
    with pytest.raises(ValueError, match="shape"):
        lt.fn(torch.zeros(2, 2), None, torch.zeros(2, 3))
