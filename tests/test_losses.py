"""Maths-first tests of vcb_lib.losses: independent implementations, closed forms, invariances.

The references below are written from the paper (Eq. 10, 19, 20, App. A.4, Table 1, A.12) with
plain Python loops and ``math``, sharing no code with the module under test.
"""
from __future__ import annotations

import inspect
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vcb_lib.losses import (
    LossType,
    dpo_loss,
    ipo_loss,
    rrhf_loss,
    sft_loss,
    slic_loss,
    vcb_loss,
)

F64 = torch.float64
HP = SimpleNamespace(
    gamma=0.1, lam=1.0, reduction="logsumexp", delta=1.0, sft_weight=1.0, pairs="all", length_penalty=1.0, top_k=1,
    normalize="prompt_std", eta=1.0, sigma_floor=0.0, sigma_policy="floor", alpha=1.0, value_gamma=1.0,
    offset_scale=1.0, cut_alpha=1.0, cut_lambda=1.1,
)
# The losses on summed sequence log-probs (B, n): every test of this file that calls lt.fn generically.
# CUT (token level, judged) has the same checks on its own inputs in test_cut.py.
SEQUENCE = [lt for lt in LossType if not lt.token_level]


def hparams(lt: LossType, **over) -> dict:
    cfg = SimpleNamespace(**{**vars(HP), **over})
    return {k: getattr(cfg, k) for k in lt.hparams}


def random_batch(seed: int, B: int = 5, n: int = 4, dtype=F64, int_rewards: bool = False):
    """Random (B, n) inputs; rows have 0..n valid entries (row 0 all valid, row 1 one valid, row 2 none)."""
    g = torch.Generator().manual_seed(seed)
    policy = -20 + 5 * torch.randn(B, n, generator=g, dtype=dtype)
    ref = policy + torch.randn(B, n, generator=g, dtype=dtype)
    if int_rewards:
        rewards = torch.randint(-3, 4, (B, n), generator=g).to(dtype)
    else:
        rewards = torch.randn(B, n, generator=g, dtype=dtype)
    n_tokens = torch.randint(1, 30, (B, n), generator=g).to(dtype)
    mask = torch.rand(B, n, generator=g) < 0.7
    mask[0] = True
    if B > 2:
        mask[1] = False
        mask[1, n - 1] = True
        mask[2] = False
    return policy, ref, rewards, mask, n_tokens


# --------------------------------------------------------------------------------------------
# Independent references (python loops, float64, math)
# --------------------------------------------------------------------------------------------


def _rows(policy, ref, rewards, mask):
    P, R, W, M = policy.tolist(), ref.tolist(), rewards.tolist(), mask.tolist()
    for b in range(len(P)):
        idx = [i for i, v in enumerate(M[b]) if v]
        yield [P[b][i] for i in idx], [R[b][i] for i in idx], [W[b][i] for i in idx]


def _eq19(p, q, r, gamma, i, j):
    m = len(r)
    mu = sum(r) / m
    sigma = math.sqrt(sum((x - mu) ** 2 for x in r) / m)  # Eq. 10, population
    reward_term = (r[i] - r[j]) / sigma if sigma > 0 else 0.0
    return (gamma * (p[i] - q[i]) - gamma * (p[j] - q[j]) - reward_term) ** 2


def _lse(xs):
    mx = max(xs)
    return mx + math.log(sum(math.exp(x - mx) for x in xs))


def direct_vcb(policy, ref, rewards, mask, gamma, lam, reduction="logsumexp", diagonal=False, subtract_log_k=True):
    """Eq. 19-20 with loops. diagonal=True: Eq. 20 literally (j from i), no constant."""
    out = []
    for p, q, r in _rows(policy, ref, rewards, mask):
        m = len(r)
        pairs = [(i, j) for i in range(m) for j in range(i if diagonal else i + 1, m)]
        if not pairs:
            out.append(0.0)
            continue
        ls = [_eq19(p, q, r, gamma, i, j) for i, j in pairs]
        if reduction == "mean":
            out.append(sum(ls) / len(ls))
        else:
            const = lam * math.log(len(ls)) if subtract_log_k else 0.0
            out.append(lam * _lse([l / lam for l in ls]) - const)
    return torch.tensor(out, dtype=F64)


def a4_pseudocode(policy, ref, rewards, mask, beta, lam, reduction="logsumexp"):
    """App. A.4 per prompt, on its valid responses; population std (Eq. 10) instead of .std()."""
    out = []
    for b in range(policy.shape[0]):
        v = mask[b]
        if v.sum() == 0:
            out.append(float("nan"))
            continue
        r = rewards[b][v]
        policy_logits, sft_logits = policy[b][v] * beta, ref[b][v] * beta
        scores = (policy_logits - sft_logits - r / r.std(unbiased=False))[:, None]
        if r.std(unbiased=False) == 0:
            scores = policy_logits[:, None] - sft_logits[:, None]
        loss = ((scores - scores.T) ** 2) / 2
        if reduction == "mean":
            out.append(loss.mean().item())
        else:
            out.append((lam * torch.logsumexp(loss.flatten() / lam, 0)).item())
    return torch.tensor(out, dtype=F64)


def textbook_pair(kind, pw, pl, qw, ql, gamma, delta=1.0):
    """Table 1 / A.12 on a single (x, y_w, y_l) triple."""
    hw, hl = pw - qw, pl - ql
    if kind == "dpo":
        return -math.log(1 / (1 + math.exp(-gamma * (hw - hl))))
    if kind == "ipo":
        return (hw - hl - 1 / (2 * gamma)) ** 2
    if kind == "slic":
        return max(0.0, delta - gamma * pw + gamma * pl)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# VCB against the paper
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reduction", ["logsumexp", "mean"])
@pytest.mark.parametrize("gamma,lam", [(0.05, 1.0), (0.7, 0.3), (2.0, 5.0)])
def test_vcb_equals_direct_eq19_20(seed, reduction, gamma, lam):
    policy, ref, rewards, mask, _ = random_batch(seed, B=6, n=5, int_rewards=seed % 2 == 1)
    got, _ = vcb_loss(policy, ref, rewards, mask, gamma=gamma, lam=lam, reduction=reduction)
    want = direct_vcb(policy, ref, rewards, mask, gamma, lam, reduction)
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_vcb_relation_to_eq20_with_diagonal(seed):
    """Eq20_λ = λ·log(K·exp(L_λ/λ) + m): Eq. 20 also sums the m diagonal terms l_ii = 0."""
    gamma, lam = 0.3, 0.8
    policy, ref, rewards, mask, _ = random_batch(seed, B=6, n=5)
    L, _ = vcb_loss(policy, ref, rewards, mask, gamma=gamma, lam=lam)
    eq20 = direct_vcb(policy, ref, rewards, mask, gamma, lam, diagonal=True, subtract_log_k=False)
    for b in range(6):
        m = int(mask[b].sum())
        if m == 0:
            continue
        K = m * (m - 1) / 2
        assert eq20[b].item() == pytest.approx(lam * math.log(K * math.exp(L[b].item() / lam) + m), rel=1e-12, abs=1e-12)
    # not the i<j logsumexp plus a constant: the gap λ·log(1 + m/S) is > 0 and shrinks as the loss grows
    m0 = int(mask[0].sum())
    gap = eq20[0].item() - (L[0].item() + lam * math.log(m0 * (m0 - 1) / 2))
    assert gap > 1e-12
    at_opt = lam * math.log(m0 * (m0 - 1) / 2 + m0)  # L = 0 (Eq. 12): Eq20 = λ·log(K + m)
    assert at_opt - lam * math.log(m0 * (m0 - 1) / 2) > 100 * gap


@pytest.mark.parametrize("seed", range(3))
def test_vcb_relation_to_a4_pseudocode(seed):
    """A4_λ = λ·log(2K·exp(L_{2λ}/(2λ)) + m) and mean(A4 matrix) = (m-1)/(2m)·mean over i<j."""
    gamma, lam = 0.4, 0.6
    policy, ref, rewards, mask, _ = random_batch(seed, B=6, n=5)
    a4 = a4_pseudocode(policy, ref, rewards, mask, gamma, lam)
    L2, _ = vcb_loss(policy, ref, rewards, mask, gamma=gamma, lam=2 * lam)
    a4_mean = a4_pseudocode(policy, ref, rewards, mask, gamma, lam, reduction="mean")
    L_mean, _ = vcb_loss(policy, ref, rewards, mask, gamma=gamma, reduction="mean")
    for b in range(6):
        m = int(mask[b].sum())
        if m == 0:
            continue
        K = m * (m - 1) / 2
        want = lam * math.log(2 * K * math.exp(L2[b].item() / (2 * lam)) + m)
        assert a4[b].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert a4_mean[b].item() == pytest.approx((m - 1) / (2 * m) * L_mean[b].item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("reduction", ["logsumexp", "mean"])
@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_vcb_zero_exactly_at_eq12(reduction, lam):
    """policy = ref + r/(γσ) + c(x) satisfies Eq. 12, so the loss (with -λ·log K) is 0."""
    gamma = 0.05
    _, ref, rewards, mask, _ = random_batch(7, B=6, n=5)
    m = mask.sum(-1, keepdim=True).clamp_min(1)
    mu = (rewards * mask).sum(-1, keepdim=True) / m
    sigma = (((rewards - mu) * mask) ** 2).sum(-1, keepdim=True).div(m).sqrt().clamp_min(1e-300)
    c = torch.randn(6, 1, dtype=F64) * 3
    policy = (ref + rewards / (gamma * sigma) + c).masked_fill(~mask, float("nan"))
    loss, metrics = vcb_loss(policy, ref, rewards, mask, gamma=gamma, lam=lam, reduction=reduction)
    assert loss.abs().max() <= 1e-12
    assert metrics["rewards/accuracies"] == 1.0
    # and strictly positive once Eq. 12 is violated
    bumped, _ = vcb_loss(policy + 0.1 * mask, ref, rewards, mask, gamma=gamma, lam=lam, reduction=reduction)
    moved = policy.clone()
    moved[0, 0] += 1.0
    off, _ = vcb_loss(moved, ref, rewards, mask, gamma=gamma, lam=lam, reduction=reduction)
    assert bumped.abs().max() <= 1e-12 and off[0] > 1e-6


def test_vcb_log_k_constant_changes_no_gradient():
    gamma, lam = 0.2, 0.7
    policy, ref, rewards, mask, _ = random_batch(3, B=6, n=5)
    p1 = policy.clone().requires_grad_()
    vcb_loss(p1, ref, rewards, mask, gamma=gamma, lam=lam)[0].sum().backward()
    # independent torch form without the constant: λ·logsumexp over valid i<j pairs
    p2 = policy.clone().requires_grad_()
    total = 0.0
    for b in range(6):
        v = mask[b]
        if v.sum() < 2:
            continue
        r = rewards[b][v]
        s = gamma * (p2[b][v] - ref[b][v]) - r / r.std(unbiased=False)
        iu = torch.triu_indices(len(r), len(r), 1)
        total = total + lam * torch.logsumexp((s[iu[0]] - s[iu[1]]) ** 2 / lam, 0)
    total.backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-12, atol=1e-14)
    assert p1.grad.abs().sum() > 0


def test_vcb_logsumexp_weights_hard_pairs():
    """λ → ∞ gives the plain mean over pairs; λ → 0 gives the hardest pair (minus λ·log K)."""
    policy, ref, rewards, mask, _ = random_batch(11, B=4, n=5)
    mean, metrics = vcb_loss(policy, ref, rewards, mask, gamma=0.5, reduction="mean")
    big, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.5, lam=1e6)
    torch.testing.assert_close(big, mean, rtol=1e-4, atol=1e-8)
    lam = 1e-3
    small, m0 = vcb_loss(policy[:1], ref[:1], rewards[:1], mask[:1], gamma=0.5, lam=lam)
    m = int(mask[0].sum())
    p, q, r = next(_rows(policy[:1], ref[:1], rewards[:1], mask[:1]))
    hardest = max(_eq19(p, q, r, 0.5, i, j) for i in range(m) for j in range(i + 1, m))
    assert small.item() == pytest.approx(hardest - lam * math.log(m * (m - 1) / 2), rel=1e-6)
    assert m0["vcb/pair_loss_max"].item() == pytest.approx(hardest, rel=1e-12)
    assert small.item() > mean[0].item()


# --------------------------------------------------------------------------------------------
# VCB invariances (hypothesis)
# --------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift=st.lists(st.floats(-100, 100), min_size=4, max_size=4),
    scale=st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
    reduction=st.sampled_from(["logsumexp", "mean"]),
    lam=st.floats(0.05, 20),
)
def test_vcb_invariant_to_per_prompt_shift_and_scale(seed, shift, scale, reduction, lam):
    policy, ref, rewards, mask, _ = random_batch(seed, B=4, n=5, int_rewards=True)  # ties and σ=0 rows occur
    a = torch.tensor(scale, dtype=F64)[:, None]
    c = torch.tensor(shift, dtype=F64)[:, None]
    base, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.3, lam=lam, reduction=reduction)
    shifted, _ = vcb_loss(policy, ref, rewards + c, mask, gamma=0.3, lam=lam, reduction=reduction)
    scaled, _ = vcb_loss(policy, ref, a * rewards, mask, gamma=0.3, lam=lam, reduction=reduction)
    both, _ = vcb_loss(policy, ref, a * rewards + c, mask, gamma=0.3, lam=lam, reduction=reduction)
    for other in (shifted, scaled, both):
        torch.testing.assert_close(other, base, rtol=1e-8, atol=1e-10)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.lists(st.floats(-50, 50), min_size=3, max_size=3))
def test_vcb_invariant_to_per_prompt_log_ratio_constant(seed, shift):
    """Only differences of Δπ within a prompt matter (Z(x) cancels, Eq. 17)."""
    policy, ref, rewards, mask, _ = random_batch(seed, B=3, n=4)
    c = torch.tensor(shift, dtype=F64)[:, None]
    base, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.2)
    moved, _ = vcb_loss(policy + c, ref, rewards, mask, gamma=0.2)
    torch.testing.assert_close(moved, base, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------
# σ = 0, fewer than two responses, padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.1, -3.7, 1e8])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_vcb_equal_rewards_pull_log_ratios_together(value, dtype):
    gamma = 0.5
    policy = torch.tensor([[-3.0, -5.0, -4.0]], dtype=dtype, requires_grad=True)
    ref = torch.tensor([[-4.0, -4.0, -4.0]], dtype=dtype)
    rewards = torch.full((1, 3), value, dtype=dtype)
    loss, metrics = vcb_loss(policy, ref, rewards, gamma=gamma, reduction="mean")
    # reward term is 0: l_ij = γ²(Δi - Δj)², Δ = [1, -1, 0]
    want = gamma**2 * (4 + 1 + 1) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert policy.grad[0, 0] > 0 > policy.grad[0, 1]  # descent moves Δ0 down and Δ1 up
    assert metrics["vcb/frac_sigma_zero"] == 1.0
    lse, _ = vcb_loss(policy, ref, rewards, gamma=gamma)
    assert torch.isfinite(lse).all() and lse.item() > 0


@pytest.mark.parametrize("lt", SEQUENCE)
def test_fewer_than_two_valid_responses(lt):
    policy = torch.tensor([[-2.0, 5.0, 7.0], [-3.0, -1.0, 0.0]], dtype=F64, requires_grad=True)
    ref = torch.zeros(2, 3, dtype=F64)
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    loss, metrics = lt.fn(policy, ref, rewards, mask, n_tokens=torch.full((2, 3), 4.0, dtype=F64), **hparams(lt))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad[:, 1:] == 0).all() and (policy.grad[1] == 0).all()
    assert loss[1] == 0
    if lt.pairwise and lt not in (LossType.SLIC, LossType.RRHF):
        assert loss[0] == 0 and policy.grad[0, 0] == 0
    else:  # NLL of the single (best) response: -(-2)/4
        assert loss[0].item() == pytest.approx(0.5 * (1 if lt in (LossType.REST, LossType.SFT) else HP.sft_weight))
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("lt", SEQUENCE)
@pytest.mark.parametrize("garbage", [float("inf"), float("-inf"), float("nan"), 1e30])
def test_padded_garbage_changes_nothing(lt, garbage):
    """Adding a padded column full of garbage leaves losses unchanged; its gradient is exactly 0."""
    policy, ref, rewards, mask, n_tokens = random_batch(5, B=5, n=4)
    clean, _ = lt.fn(policy, ref, rewards, mask, n_tokens=n_tokens, **hparams(lt))
    pad = torch.full((5, 1), garbage, dtype=F64)
    policy2 = torch.cat([policy.masked_fill(~mask, garbage), pad], 1).requires_grad_()
    ref2 = torch.cat([ref.masked_fill(~mask, garbage), pad], 1)
    rewards2 = torch.cat([rewards.masked_fill(~mask, garbage), pad], 1)
    n_tok2 = torch.cat([n_tokens.masked_fill(~mask, 0), torch.zeros(5, 1, dtype=F64)], 1)
    mask2 = torch.cat([mask, torch.zeros(5, 1, dtype=torch.bool)], 1)
    dirty, metrics = lt.fn(policy2, ref2, rewards2, mask2, n_tokens=n_tok2, **hparams(lt))
    torch.testing.assert_close(dirty, clean, rtol=1e-12, atol=1e-12)
    dirty.sum().backward()
    assert torch.isfinite(policy2.grad).all()
    assert (policy2.grad[~mask2] == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("lt", SEQUENCE)
def test_prompts_are_independent(lt):
    """Each prompt's loss is the same computed alone or in a batch."""
    policy, ref, rewards, mask, n_tokens = random_batch(9, B=5, n=4)
    batched, _ = lt.fn(policy, ref, rewards, mask, n_tokens=n_tokens, **hparams(lt))
    for b in range(5):
        s = slice(b, b + 1)
        alone, _ = lt.fn(policy[s], ref[s], rewards[s], mask[s], n_tokens=n_tokens[s], **hparams(lt))
        torch.testing.assert_close(alone, batched[s], rtol=1e-12, atol=1e-12)


def test_float32_matches_float64():
    policy, ref, rewards, mask, n_tokens = random_batch(2, B=6, n=5)
    for lt in SEQUENCE:
        l64, _ = lt.fn(policy, ref, rewards, mask, n_tokens=n_tokens, **hparams(lt))
        l32, m32 = lt.fn(policy.float(), ref.float(), rewards.float(), mask, n_tokens=n_tokens.float(), **hparams(lt))
        assert l32.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m32.values())
        torch.testing.assert_close(l32.double(), l64, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Order-based baselines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,fn", [("dpo", dpo_loss), ("ipo", ipo_loss), ("slic", slic_loss)])
@pytest.mark.parametrize("swap", [False, True])
def test_pairwise_losses_equal_textbook_on_triples(kind, fn, swap):
    """n = 2 reduces to one (x, y_w, y_l) triple; the reward order decides which is y_w."""
    g = torch.Generator().manual_seed(1)
    policy = -10 + 3 * torch.randn(8, 2, generator=g, dtype=F64)
    ref = -10 + 3 * torch.randn(8, 2, generator=g, dtype=F64)
    rewards = torch.tensor([[1.0, 0.0]] * 8, dtype=F64)
    if swap:
        rewards = rewards.flip(-1)
    gamma, delta = 0.3, 0.7
    kw = dict(gamma=gamma)
    if kind == "slic":
        kw.update(delta=delta, sft_weight=0.0)
    got, _ = fn(policy, ref, rewards, **kw)
    w, l = (1, 0) if swap else (0, 1)
    P, R = policy.tolist(), ref.tolist()
    want = [textbook_pair(kind, P[b][w], P[b][l], R[b][w], R[b][l], gamma, delta) for b in range(8)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)


def test_dpo_equals_logsigmoid_and_means_over_all_pairs():
    gamma = 0.1
    policy, ref, rewards, mask, _ = random_batch(4, B=6, n=5)
    got, metrics = dpo_loss(policy, ref, rewards, mask, gamma=gamma)
    for b in range(6):
        idx = mask[b].nonzero().flatten().tolist()
        terms = [
            -F.logsigmoid(gamma * ((policy[b, w] - ref[b, w]) - (policy[b, l] - ref[b, l])))
            for w in idx for l in idx if rewards[b, w] > rewards[b, l]
        ]
        want = torch.stack(terms).mean() if terms else torch.tensor(0.0, dtype=F64)
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)
    assert metrics["rewards/margins"] == pytest.approx(
        (metrics["rewards/chosen"] - metrics["rewards/rejected"]).item(), abs=1e-12
    )
    assert not any(v.requires_grad for v in metrics.values())


def test_pairs_all_vs_best_worst():
    policy = torch.tensor([[-1.0, -2.0, -4.0], [-1.0, -2.0, -4.0]], dtype=F64)
    ref = torch.zeros(2, 3, dtype=F64)
    rewards = torch.tensor([[0.2, 0.9, 0.5], [0.3, 0.3, 0.3]], dtype=F64)  # row 1: all tied
    gamma = 0.5
    all_, m_all = dpo_loss(policy, ref, rewards, gamma=gamma, pairs="all")
    bw, m_bw = dpo_loss(policy, ref, rewards, gamma=gamma, pairs="best_worst")
    t = lambda w, l: textbook_pair("dpo", policy[0, w].item(), policy[0, l].item(), 0.0, 0.0, gamma)
    assert all_[0].item() == pytest.approx((t(1, 0) + t(1, 2) + t(2, 0)) / 3, rel=1e-12)
    assert bw[0].item() == pytest.approx(t(1, 0), rel=1e-12)  # best = index 1, worst = index 0
    assert all_[1] == 0 and bw[1] == 0  # ties make no pair
    assert m_all["pairs/per_prompt"] == 1.5 and m_bw["pairs/per_prompt"] == 0.5
    # SLiC with tied rewards keeps only the cross-entropy term on the first best response
    sl, _ = slic_loss(policy, None, rewards, gamma=gamma, sft_weight=2.0, pairs="best_worst")
    assert sl[1].item() == pytest.approx(2.0 * 1.0)


def test_rrhf_hand_computed():
    logps = torch.tensor([[-2.0, -6.0, -3.0]], dtype=F64)
    n_tokens = torch.tensor([[2.0, 3.0, 1.0]], dtype=F64)  # p = [-1, -2, -3]
    rewards = torch.tensor([[0.5, 2.0, 1.0]], dtype=F64)
    # pairs (w,l): (1,0): max(0,-1+2)=1; (1,2): max(0,-3+2)=0; (2,0): max(0,-1+3)=2 -> 3; SFT: 6/3=2
    loss, _ = rrhf_loss(logps, None, rewards, sft_weight=0.5, n_tokens=n_tokens)
    assert loss.item() == pytest.approx(3 + 0.5 * 2)
    loss, _ = rrhf_loss(logps, None, rewards, sft_weight=0.5, pairs="best_worst", n_tokens=n_tokens)
    assert loss.item() == pytest.approx(1 + 0.5 * 2)
    # raw log-probs without n_tokens: (1,0): 4; (1,2): 3; (2,0): 1 -> 8; SFT: 6
    loss, _ = rrhf_loss(logps, None, rewards, sft_weight=0.5)
    assert loss.item() == pytest.approx(8 + 0.5 * 6)
    # length_penalty = 0: raw scores, per-token SFT
    loss, _ = rrhf_loss(logps, None, rewards, sft_weight=0.5, length_penalty=0.0, n_tokens=n_tokens)
    assert loss.item() == pytest.approx(8 + 0.5 * 2)


def test_slic_sft_term_is_per_token_nll_of_best():
    logps = torch.tensor([[-1.0, -3.7, -6.1]], dtype=F64)
    rewards = torch.tensor([[1.0, 3.0, 2.0]], dtype=F64)
    n_tokens = torch.tensor([[2.0, 4.0, 5.0]], dtype=F64)
    gamma, delta = 0.5, 1.0
    # pairs (1,0): 1 - 0.5(-3.7+1) = 2.35; (2,0): 1 - 0.5(-6.1+1) = 3.55; (1,2): 1 - 1.2 -> 0
    loss, m = slic_loss(logps, None, rewards, gamma=gamma, delta=delta, sft_weight=0.3, n_tokens=n_tokens)
    assert loss.item() == pytest.approx((2.35 + 3.55 + 0.0) / 3 + 0.3 * 3.7 / 4)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)


def test_sft_and_rest_selection():
    logps = torch.tensor([[-4.0, -6.0, -9.0]], dtype=F64)
    n_tokens = torch.tensor([[2.0, 3.0, 3.0]], dtype=F64)
    rewards = torch.tensor([[1.0, 3.0, 2.0]], dtype=F64)
    rest, sft = LossType.REST.fn, LossType.SFT.fn
    assert rest(logps, None, rewards, n_tokens=n_tokens, top_k=1)[0].item() == pytest.approx(2.0)
    assert rest(logps, None, rewards, n_tokens=n_tokens, top_k=2)[0].item() == pytest.approx(15 / 6)
    assert rest(logps, None, rewards, n_tokens=n_tokens, top_k=9)[0].item() == pytest.approx(19 / 8)
    assert rest(logps, None, rewards, top_k=2)[0].item() == pytest.approx(15 / 2)
    assert sft(logps, None, None, n_tokens=n_tokens)[0].item() == pytest.approx(19 / 8)
    assert sft(logps, None, None)[0].item() == pytest.approx(19 / 3)
    mask = torch.tensor([[True, False, True]])
    assert rest(logps, None, rewards, mask, n_tokens=n_tokens)[0].item() == pytest.approx(3.0)
    assert sft_loss(logps, None, rewards, mask, select="all")[0].item() == pytest.approx(13 / 2)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _kink_free_inputs():
    # rewards [1, 3, 2] -> SLiC/RRHF hinge arguments stay >= 0.2 away from 0 (see slic test)
    policy = torch.tensor([[-1.0, -3.7, -6.1], [-2.0, -2.9, -0.3]], dtype=F64)
    ref = torch.tensor([[-1.5, -3.0, -5.0], [-1.0, -3.3, -1.1]], dtype=F64)
    rewards = torch.tensor([[1.0, 3.0, 2.0], [0.4, -1.0, 0.0]], dtype=F64)
    n_tokens = torch.tensor([[2.0, 4.0, 5.0], [3.0, 2.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return policy, ref, rewards, mask, n_tokens


GRADCHECK_CASES = [(LossType.VCB, red, "all") for red in ("logsumexp", "mean")] + [
    (lt, "logsumexp", pairs) for lt in SEQUENCE[1:] for pairs in ("all", "best_worst")
]


@pytest.mark.parametrize("lt,reduction,pairs", GRADCHECK_CASES)
def test_gradcheck(lt, reduction, pairs):
    policy, ref, rewards, mask, n_tokens = _kink_free_inputs()
    kw = hparams(lt, reduction=reduction, pairs=pairs, gamma=0.5, lam=0.7)

    def f(p, q):
        return lt.fn(p, q, rewards, mask, n_tokens=n_tokens, **kw)[0]

    p, q = policy.clone().requires_grad_(), ref.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (p, q), eps=1e-6, atol=1e-7)
    f(p, q).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradients_finite_on_extreme_values():
    policy = torch.tensor([[-1e4, -1.0, -500.0], [-50.0, -50.0, -50.0]], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([[-1.0, -1e4, -2.0], [-50.0, -50.0, -50.0]], dtype=torch.float32)
    rewards = torch.tensor([[1e6, -1e6, 0.0], [2.0, 2.0, 2.0]], dtype=torch.float32)
    for lt in SEQUENCE:
        loss, _ = lt.fn(policy, ref, rewards, n_tokens=torch.full((2, 3), 7.0), **hparams(lt, lam=0.01))
        assert torch.isfinite(loss).all(), lt
        loss.sum().backward()
        assert torch.isfinite(policy.grad).all(), lt
        policy.grad = None


# --------------------------------------------------------------------------------------------
# LossType registry and input validation
# --------------------------------------------------------------------------------------------


def test_loss_type_facts():
    facts = {lt: (lt.needs_reference, lt.uses_reward_values, lt.pairwise) for lt in LossType}
    assert facts == {
        LossType.VCB: (True, True, True),
        LossType.DPO: (True, False, True),
        LossType.IPO: (True, False, True),
        LossType.SLIC: (False, False, True),
        LossType.RRHF: (False, False, True),
        LossType.REST: (False, False, False),
        LossType.SFT: (False, False, False),
        LossType.INFONCA: (True, True, True),
        LossType.NCA: (True, True, True),
        LossType.A2PO: (True, True, True),
        LossType.ODPO: (True, True, True),
        LossType.CUT: (False, False, False),
        LossType.BT: (False, False, True),
    }
    assert [lt.value for lt in LossType] == ["vcb", "dpo", "ipo", "slic", "rrhf", "rest", "sft", "infonca", "nca",
                                             "a2po", "odpo", "cut", "bt"]
    assert [lt for lt in LossType if lt.token_level or lt.judged] == [LossType.CUT]
    assert LossType.CUT.data_hparams == ("cut_positive", "cut_judge", "cut_judge_model")
    assert all(not lt.data_hparams for lt in SEQUENCE)
    assert LossType.parse("VCB") is LossType.VCB and LossType(" ReST ") is LossType.REST
    assert LossType.REST.fn.keywords == {"select": "best"} and LossType.SFT.fn.keywords["select"] == "all"


@pytest.mark.parametrize("lt", list(LossType))
def test_hparams_are_exactly_the_keyword_arguments(lt):
    fn = lt.fn
    fixed = getattr(fn, "keywords", {})
    sig = inspect.signature(fn)
    judged = ("judged_logps", "negative") if lt.judged else ()  # the batch's inputs of a judged loss, not hparams
    kwonly = [k for k, p in sig.parameters.items()
              if p.kind is p.KEYWORD_ONLY and k not in ("n_tokens", *judged) and k not in fixed]
    assert list(lt.hparams) == kwonly
    assert list(sig.parameters)[:4] == ["policy_logps", "ref_logps", "rewards", "mask"]


@pytest.mark.parametrize("lt", SEQUENCE)
def test_uniform_trainer_call(lt):
    policy, ref, rewards, mask, n_tokens = random_batch(0, B=3, n=4)
    policy.requires_grad_()
    q = ref if lt.needs_reference else None
    losses, metrics = lt.fn(policy, q, rewards, mask, n_tokens=n_tokens, **hparams(lt))
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert metrics and all(not v.requires_grad and v.dim() == 0 for v in metrics.values())
    losses.mean().backward()
    # the gradient the trainer gets is the loss's: central finite differences (float64) of every entry
    # (a masked-out entry's is 0: the loss does not read it)
    eps, numeric = 1e-6, torch.zeros_like(policy)
    with torch.no_grad():
        for i, j in itertools.product(*map(range, policy.shape)):
            step = torch.zeros_like(policy)
            step[i, j] = eps
            up, down = (lt.fn(policy + s, q, rewards, mask, n_tokens=n_tokens, **hparams(lt))[0].mean() for s in (step, -step))
            numeric[i, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(policy.grad, numeric, rtol=1e-5, atol=1e-8)
    assert policy.grad[mask].abs().sum() > 0 and (policy.grad[~mask] == 0).all()


def test_unknown_loss_name_lists_allowed():
    with pytest.raises(ValueError, match="unknown loss type 'ppo'; allowed: vcb, dpo, ipo, slic, rrhf, rest, sft"):
        LossType.parse("ppo")
    with pytest.raises(ValueError, match="allowed: vcb"):
        LossType("kto")


def test_input_errors():
    p = torch.zeros(2, 3, dtype=F64)
    r = torch.arange(6, dtype=F64).view(2, 3)
    for bad in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
            vcb_loss(p, p, r, gamma=bad)
        with pytest.raises(ValueError, match="gamma"):
            dpo_loss(p, p, r, gamma=bad)
    with pytest.raises(ValueError, match="lam must be"):
        vcb_loss(p, p, r, gamma=0.1, lam=0)
    with pytest.raises(ValueError, match=r"rewards has shape \(2, 4\) but policy_logps has shape \(2, 3\)"):
        vcb_loss(p, p, torch.zeros(2, 4), gamma=0.1)
    with pytest.raises(ValueError, match=r"mask has shape \(3,\)"):
        dpo_loss(p, p, r, torch.ones(3, dtype=torch.bool), gamma=0.1)
    with pytest.raises(ValueError, match="policy_logps must be a floating"):
        vcb_loss(torch.zeros(6), p, r, gamma=0.1)
    with pytest.raises(ValueError, match="unknown reduction 'sum'; allowed: 'logsumexp', 'mean'"):
        vcb_loss(p, p, r, gamma=0.1, reduction="sum")
    with pytest.raises(ValueError, match="unknown pairs 'top'; allowed: 'all', 'best_worst'"):
        ipo_loss(p, p, r, gamma=0.1, pairs="top")
    with pytest.raises(ValueError, match="ref_logps is required"):
        dpo_loss(p, None, r, gamma=0.1)
    with pytest.raises(ValueError, match="mask must be a bool"):
        vcb_loss(p, p, r, torch.ones(2, 3), gamma=0.1)
    with pytest.raises(ValueError, match="rewards are required"):
        sft_loss(p, None, None, select="best")
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        sft_loss(p, None, r, top_k=0)
    with pytest.raises(ValueError, match="delta must be"):
        slic_loss(p, None, r, gamma=0.1, delta=-1.0)


def _compact(x: torch.Tensor, keep: torch.Tensor, fill=0.0) -> torch.Tensor:
    """(B, n) -> (B, max kept): each row's kept entries, in order, padded with ``fill``."""
    width = int(keep.sum(-1).max())
    out = torch.full((x.shape[0], width), fill, dtype=x.dtype)
    for b in range(x.shape[0]):
        row = x[b][keep[b]]
        out[b, :len(row)] = row
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lt,over", [(lt, {}) for lt in SEQUENCE] + [
    (lt, {"pairs": "best_worst"}) for lt in (LossType.DPO, LossType.IPO, LossType.SLIC, LossType.RRHF, LossType.ODPO)] + [
    (LossType.REST, {"top_k": 2})])
def test_used_candidates_carry_the_whole_loss(seed, lt, over):
    """Dropping the candidates ``used_candidates`` leaves out (as the Trainer does before the
    forward pass) changes no loss, no gradient and no metric; ties included (integer rewards)."""
    policy, ref, rewards, mask, n_tokens = random_batch(seed, B=6, n=5, int_rewards=seed % 2 == 0)
    hp = hparams(lt, **over)
    used = lt.used_candidates(rewards, mask, **vars(HP) | over)  # keys of other losses are ignored
    assert not (used & ~mask).any() and (used.any(-1) == mask.any(-1)).all()  # only valid ones, every prompt kept
    if lt is LossType.REST or over.get("pairs") == "best_worst":
        assert (used.sum(-1) <= (2 if lt.pairwise else hp["top_k"])).all()  # SLiC/RRHF's NLL reads the best too
        assert used.sum() < mask.sum()  # it does prune
    else:
        assert torch.equal(used, mask)
    policy.requires_grad_()
    full, full_m = lt.fn(policy, ref, rewards, mask, n_tokens=n_tokens, **hp)
    (g_full,) = torch.autograd.grad(full.sum(), policy)
    small = _compact(policy.detach(), used).requires_grad_()
    part, part_m = lt.fn(small, _compact(ref, used), _compact(rewards, used), _compact(mask, used, False),
                         n_tokens=_compact(n_tokens, used, 1.0), **hp)
    (g_part,) = torch.autograd.grad(part.sum(), small)
    torch.testing.assert_close(part, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_compact(g_full, used), g_part, rtol=1e-12, atol=1e-12)
    assert (g_full[mask & ~used] == 0).all()
    assert part_m.keys() == full_m.keys()
    for k in full_m:
        torch.testing.assert_close(part_m[k], full_m[k], rtol=1e-12, atol=1e-12, msg=k)
