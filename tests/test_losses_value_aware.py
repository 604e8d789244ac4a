"""The value-aware loss family (issue 19): VCB's design choices as options of ``vcb_loss`` and its
relatives InfoNCA, NCA, A*-PO's regression and ODPO.

Every loss is checked against a reference written here with plain Python loops over prompts,
candidates and pairs (float64, ``math`` for the constants, autograd through scalar tensor ops for
the gradient), sharing no code with ``vcb_lib.losses``; against the formulas of NeMo-Aligner
(``rpo_sq``), REBEL and TRL (``sigmoid`` with label smoothing, ``nca_pair``) written inline; for
the invariances the maths promises; and on masks, σ = 0 and one-candidate prompts.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vcb_lib.losses import (
    NORMALIZES,
    LossType,
    a2po_loss,
    dpo_loss,
    infonca_loss,
    nca_loss,
    odpo_loss,
    vcb_loss,
)

F64 = torch.float64
RELATIVES = {"infonca": infonca_loss, "nca": nca_loss, "a2po": a2po_loss, "odpo": odpo_loss}
HP = {"infonca": {"gamma": 0.3, "alpha": 0.7}, "nca": {"gamma": 0.3, "alpha": 0.7},
      "a2po": {"gamma": 0.3, "value_gamma": 0.6}, "odpo": {"gamma": 0.3, "offset_scale": 0.8}}
VCB_OPTIONS = [dict(normalize=nz, reduction=red) for nz in NORMALIZES for red in ("logsumexp", "mean", "max")] + [
    dict(sigma_floor=0.8, sigma_policy="floor"), dict(sigma_floor=0.8, sigma_policy="drop"),
    dict(normalize="batch_std", sigma_floor=5.0, sigma_policy="floor"),
    dict(normalize="rank", sigma_floor=0.8, sigma_policy="drop"), dict(normalize="none", eta=2.5, reduction="mean"),
]


def batch(seed: int, B: int = 5, n: int = 4, int_rewards: bool = False):
    """Random (B, n) inputs; row 0 all valid, row 1 one valid, row 2 none, the others random."""
    g = torch.Generator().manual_seed(seed)
    policy = -20 + 5 * torch.randn(B, n, generator=g, dtype=F64)
    ref = policy + torch.randn(B, n, generator=g, dtype=F64)
    rewards = (torch.randint(-2, 3, (B, n), generator=g).to(F64) if int_rewards
               else torch.randn(B, n, generator=g, dtype=F64))
    mask = torch.rand(B, n, generator=g) < 0.7
    mask[0] = True
    mask[1] = False
    mask[1, n - 1] = True
    mask[2] = False
    return policy, ref, rewards, mask


# --------------------------------------------------------------------------------------------
# Independent references: loops over prompts, candidates and pairs
# --------------------------------------------------------------------------------------------


def _prompts(policy, ref, rewards, mask):
    """Per prompt: the valid candidates' policy log-probs (scalar tensors, in the graph), ref
    log-probs and rewards (floats)."""
    for b in range(policy.shape[0]):
        idx = [i for i in range(policy.shape[1]) if bool(mask[b, i])]
        yield [policy[b, i] for i in idx], [float(ref[b, i]) for i in idx], [float(rewards[b, i]) for i in idx]


def _pstd(xs):
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))  # Eq. 10: population std


def _average_ranks(xs):
    """1-based ranks, ties get the average of their positions (sort, then walk groups of equals)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    k = 0
    while k < len(order):
        e = k
        while e + 1 < len(order) and xs[order[e + 1]] == xs[order[k]]:
            e += 1
        for pos in range(k, e + 1):
            ranks[order[pos]] = (k + e) / 2 + 1
        k = e + 1
    return ranks


def _zero(policy):
    return policy.sum() * 0.0  # a 0 in the graph (zero gradient)


def ref_vcb(policy, ref, rewards, mask, *, gamma, lam=1.0, reduction="logsumexp", normalize="prompt_std", eta=1.0,
            sigma_floor=0.0, sigma_policy="floor"):
    rows = list(_prompts(policy, ref, rewards, mask))
    kept = [len(r) >= 2 and not (sigma_policy == "drop" and _pstd(r) < sigma_floor) for _, _, r in rows]
    floor = sigma_floor if sigma_policy == "floor" else 0.0
    if normalize == "batch_std":  # rewards minus their prompt's mean, over the kept prompts
        dev = [x - sum(r) / len(r) for (_, _, r), k in zip(rows, kept) if k for x in r]
        sigma_b = math.sqrt(sum(d * d for d in dev) / len(dev)) if dev else 0.0
    out = []
    for (p, q, r), k in zip(rows, kept):
        if not k:
            out.append(_zero(policy))
            continue
        if normalize == "prompt_std":
            s, div = r, max(_pstd(r), floor)
        elif normalize == "batch_std":
            s, div = r, max(sigma_b, floor)
        elif normalize == "rank":
            s = _average_ranks(r)
            div = _pstd(s)
        else:
            s, div = [eta * x for x in r], 1.0
        div = div if div > 0 else 1.0  # all equal: every s_i - s_j is 0 anyway
        m = len(r)
        ls = [(gamma * (p[i] - q[i]) - gamma * (p[j] - q[j]) - (s[i] - s[j]) / div) ** 2
              for i in range(m) for j in range(i + 1, m)]
        if reduction == "mean":
            out.append(sum(ls) / len(ls))
        elif reduction == "max":
            out.append(torch.stack(ls).max())
        else:
            out.append(lam * torch.logsumexp(torch.stack(ls) / lam, 0) - lam * math.log(len(ls)))
    return torch.stack(out)


def _softmax(xs):
    mx = max(xs)
    e = [math.exp(x - mx) for x in xs]
    return [v / sum(e) for v in e]


def _listwise(policy, ref, rewards, mask, per_prompt):
    """``per_prompt(d, r)`` on each prompt's implied log-ratios d_i = log π - log π_sft (scalar tensors)
    and rewards r (floats); 0 for a prompt with fewer than 2 valid candidates."""
    out = []
    for p, q, r in _prompts(policy, ref, rewards, mask):
        out.append(per_prompt([p[i] - q[i] for i in range(len(r))], r) if len(r) >= 2 else _zero(policy))
    return torch.stack(out)


def ref_infonca(policy, ref, rewards, mask, *, gamma, alpha):
    def one(d, r):
        w = _softmax([x / alpha for x in r])
        z = torch.logsumexp(torch.stack([gamma * di for di in d]), 0)
        return -sum(wi * (gamma * di - z) for wi, di in zip(w, d))

    return _listwise(policy, ref, rewards, mask, one)


def ref_nca(policy, ref, rewards, mask, *, gamma, alpha):
    def one(d, r):
        w = _softmax([x / alpha for x in r])
        return -sum(wi * F.logsigmoid(gamma * di) + F.logsigmoid(-gamma * di) / len(r) for wi, di in zip(w, d))

    return _listwise(policy, ref, rewards, mask, one)


def ref_a2po(policy, ref, rewards, mask, *, gamma, value_gamma):
    def one(d, r):
        mx, m = max(r), len(r)
        v = mx + value_gamma * math.log(sum(math.exp((x - mx) / value_gamma) for x in r) / m)  # γ' log mean e^{r/γ'}
        return sum((gamma * di - (ri - v)) ** 2 for di, ri in zip(d, r)) / m

    return _listwise(policy, ref, rewards, mask, one)


def ref_odpo(policy, ref, rewards, mask, *, gamma, offset_scale, pairs="all"):
    out = []
    for p, q, r in _prompts(policy, ref, rewards, mask):
        m = len(r)
        if pairs == "all":
            pl = [(w, l) for w in range(m) for l in range(m) if r[w] > r[l]]
        else:
            w, l = r.index(max(r)) if r else 0, r.index(min(r)) if r else 0
            pl = [(w, l)] if r and r[w] > r[l] else []
        if not pl:
            out.append(_zero(policy))
            continue
        out.append(sum(-F.logsigmoid(gamma * ((p[w] - q[w]) - (p[l] - q[l])) - offset_scale * math.log(r[w] - r[l]))
                       for w, l in pl) / len(pl))
    return torch.stack(out)


REFS = {"infonca": ref_infonca, "nca": ref_nca, "a2po": ref_a2po, "odpo": ref_odpo}


def _value_and_grad(fn, policy, *args, **kw):
    p = policy.clone().requires_grad_()
    out = fn(p, *args, **kw)
    out = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(out.sum(), p)
    return out.detach(), g


# --------------------------------------------------------------------------------------------
# Value and gradient equal the loops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("opts", VCB_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_vcb_options_equal_loop_reference(seed, opts):
    policy, ref, rewards, mask = batch(seed, B=6, n=5, int_rewards=seed == 2)  # seed 2: ties and σ = 0 prompts
    kw = dict(gamma=0.4, lam=0.7) | opts
    value, grad = _value_and_grad(vcb_loss, policy, ref, rewards, mask, **kw)
    want, want_grad = _value_and_grad(ref_vcb, policy, ref, rewards, mask, **kw)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", list(RELATIVES))
def test_relatives_equal_loop_reference(seed, name):
    policy, ref, rewards, mask = batch(seed, B=6, n=5, int_rewards=seed == 2)
    for kw in (HP[name], HP[name] | {"pairs": "best_worst"}) if name == "odpo" else (HP[name],):
        value, grad = _value_and_grad(RELATIVES[name], policy, ref, rewards, mask, **kw)
        want, want_grad = _value_and_grad(REFS[name], policy, ref, rewards, mask, **kw)
        torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_references_can_fail():
    """The loop references tell the options apart (a comparison that cannot fail proves nothing)."""
    policy, ref, rewards, mask = batch(0)
    base = ref_vcb(policy, ref, rewards, mask, gamma=0.4)
    for opts in VCB_OPTIONS:
        other, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.4, lam=0.7, **opts)
        if opts.get("normalize", "prompt_std") != "prompt_std" or opts.get("reduction", "logsumexp") != "logsumexp":
            assert (other - base).abs().max() > 1e-3, opts
    assert (ref_infonca(policy, ref, rewards, mask, gamma=0.3, alpha=0.7)
            - ref_infonca(policy, ref, rewards, mask, gamma=0.3, alpha=0.2)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# The formulas of NeMo-Aligner, REBEL and TRL, inline
# --------------------------------------------------------------------------------------------


def test_normalize_none_is_rpo_sq_and_rebel():
    """normalize="none": with n = 2 the loss is NeMo-Aligner's rpo_sq,
    (β·(Δ_chosen - Δ_rejected) - gt_reward_scale·(r_chosen - r_rejected))², β = γ, scale = η; with
    n > 2 and reduction="mean" it is the mean of that term over all pairs; REBEL's pair term at its
    first iteration is the case γ = 1/η_REBEL, η = 1."""
    g = torch.Generator().manual_seed(3)
    pi = -30 + 4 * torch.randn(8, 2, generator=g, dtype=F64)
    ref = pi + torch.randn(8, 2, generator=g, dtype=F64)
    gt = torch.randn(8, 2, generator=g, dtype=F64)
    beta, scale = 0.2, 3.0
    # NeMo-Aligner: rewards = Δπ of each response, split into chosen / rejected halves
    rewards_delta = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
    gt_rewards_delta = scale * (gt[:, 0] - gt[:, 1])
    rpo_sq = (beta * rewards_delta - gt_rewards_delta) ** 2
    for reduction in ("mean", "logsumexp", "max"):  # one pair: every aggregation is the pair term (minus λ log 1)
        ours, _ = vcb_loss(pi, ref, gt, gamma=beta, normalize="none", eta=scale, reduction=reduction)
        torch.testing.assert_close(ours, rpo_sq, rtol=1e-12, atol=1e-12)
    swapped, _ = vcb_loss(pi.flip(1), ref.flip(1), gt.flip(1), gamma=beta, normalize="none", eta=scale)
    torch.testing.assert_close(swapped, rpo_sq, rtol=1e-12, atol=1e-12)  # which one is "chosen" does not matter
    # REBEL, iteration 1 (π_t = π_sft): (1/η_R (Δπ_i - Δπ_j) - (r_i - r_j))²
    eta_rebel = 4.0
    rebel = (rewards_delta / eta_rebel - (gt[:, 0] - gt[:, 1])) ** 2
    ours, _ = vcb_loss(pi, ref, gt, gamma=1 / eta_rebel, normalize="none", eta=1.0, reduction="mean")
    torch.testing.assert_close(ours, rebel, rtol=1e-12, atol=1e-12)
    # n = 4, mean: the average of rpo_sq over the 6 pairs
    pi4, ref4, gt4 = pi.view(4, 4), ref.view(4, 4), gt.view(4, 4)
    want = torch.stack([torch.stack([(beta * ((pi4[b, i] - ref4[b, i]) - (pi4[b, j] - ref4[b, j]))
                                      - scale * (gt4[b, i] - gt4[b, j])) ** 2
                                     for i in range(4) for j in range(i + 1, 4)]).mean() for b in range(4)])
    ours, _ = vcb_loss(pi4, ref4, gt4, gamma=beta, normalize="none", eta=scale, reduction="mean")
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


def _pairs_n2():
    g = torch.Generator().manual_seed(11)
    policy = -25 + 3 * torch.randn(16, 2, generator=g, dtype=F64)
    ref = policy + torch.randn(16, 2, generator=g, dtype=F64)
    r_w = torch.rand(16, generator=g, dtype=F64) + 0.5
    rewards = torch.stack([r_w, r_w - 0.5 - torch.rand(16, generator=g, dtype=F64)], 1)  # column 0 wins by ≥ 0.5
    return policy, ref, rewards


def test_infonca_n2_is_trl_sigmoid_with_label_smoothing_and_dpo_as_alpha_vanishes():
    """InfoNCA with n = 2 is cross-entropy on two classes: TRL's "sigmoid" loss with
    label_smoothing ε = σ(-(r_w - r_l)/α), -(1-ε)·log σ(β·h) - ε·log σ(-β·h), h = Δπ_w - Δπ_l;
    as α → 0 the targets become one-hot and it is DPO ("sigmoid", ε = 0)."""
    policy, ref, rewards = _pairs_n2()
    beta, alpha = 0.1, 0.8
    chosen_logratios, rejected_logratios = policy[:, 0] - ref[:, 0], policy[:, 1] - ref[:, 1]
    logits = chosen_logratios - rejected_logratios  # TRL's names
    eps = torch.sigmoid(-(rewards[:, 0] - rewards[:, 1]) / alpha)
    trl_smoothed = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    ours, _ = infonca_loss(policy, ref, rewards, gamma=beta, alpha=alpha)
    torch.testing.assert_close(ours, trl_smoothed, rtol=1e-12, atol=1e-12)
    trl_sigmoid = -F.logsigmoid(beta * logits)
    hard, _ = infonca_loss(policy, ref, rewards, gamma=beta, alpha=1e-3)  # ε ≤ σ(-500): below float64's resolution
    torch.testing.assert_close(hard, trl_sigmoid, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hard, dpo_loss(policy, ref, rewards, gamma=beta)[0], rtol=1e-12, atol=1e-12)


def test_nca_n2_is_trl_nca_pair_and_infonca_is_not():
    """TRL's ``nca_pair`` is the pairwise NCA loss (arXiv 2402.05369, Sec. 4):
    -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l), r = β·(log π - log π_ref). ``nca_loss`` with n = 2
    and one-hot targets (α → 0) equals it; InfoNCA with n = 2 is DPO, not nca_pair (the issue's
    "InfoNCA with n = 2 equals nca_pair" holds for NCA, the other loss of the same paper)."""
    policy, ref, rewards = _pairs_n2()
    beta = 0.1
    chosen_rewards = (policy[:, 0] - ref[:, 0]) * beta
    rejected_rewards = (policy[:, 1] - ref[:, 1]) * beta
    nca_pair = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))
    ours, _ = nca_loss(policy, ref, rewards, gamma=beta, alpha=1e-3)
    torch.testing.assert_close(ours, nca_pair, rtol=1e-12, atol=1e-12)
    info, _ = infonca_loss(policy, ref, rewards, gamma=beta, alpha=1e-3)
    assert (info - nca_pair).abs().max() > 1e-2


def test_odpo_with_zero_offset_is_dpo_and_offset_is_alpha_log_gap():
    policy, ref, rewards, mask = batch(4, B=6, n=5)
    for pairs in ("all", "best_worst"):
        zero, _ = odpo_loss(policy, ref, rewards, mask, gamma=0.3, offset_scale=0.0, pairs=pairs)
        torch.testing.assert_close(zero, dpo_loss(policy, ref, rewards, mask, gamma=0.3, pairs=pairs)[0],
                                   rtol=1e-12, atol=1e-12)
    # one pair by hand: r_w - r_l = e², α = 0.5 -> offset 1.0
    p, q = torch.tensor([[-3.0, -4.0]], dtype=F64), torch.tensor([[-3.5, -3.0]], dtype=F64)
    r = torch.tensor([[math.exp(2.0), 0.0]], dtype=F64)
    loss, metrics = odpo_loss(p, q, r, gamma=2.0, offset_scale=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(2.0 * (0.5 - (-1.0)) - 1.0)))), rel=1e-12)
    assert metrics["odpo/offset"].item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Optima and limits
# --------------------------------------------------------------------------------------------


def _grad(fn, policy, ref, rewards, **kw):
    p = policy.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(p, ref, rewards, **kw)[0].sum(), p)
    return g


def test_relatives_are_stationary_at_their_closed_forms():
    """InfoNCA: softmax(γΔπ) = softmax(r/α); NCA: γΔπ_i = log(m·softmax_i(r/α)); A*-PO: γΔπ_i = r_i - V̂(x)
    (loss exactly 0 there)."""
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(4, 5, generator=g, dtype=F64)
    ref = torch.randn(4, 5, generator=g, dtype=F64) - 10
    gamma, alpha, value_gamma = 0.4, 0.6, 0.9
    target = torch.softmax(rewards / alpha, -1)
    infonca_opt = ref + (rewards / alpha + torch.randn(4, 1, generator=g, dtype=F64)) / gamma  # any shift per prompt
    assert _grad(infonca_loss, infonca_opt, ref, rewards, gamma=gamma, alpha=alpha).abs().max() < 1e-12
    nca_opt = ref + (5 * target).log() / gamma
    assert _grad(nca_loss, nca_opt, ref, rewards, gamma=gamma, alpha=alpha).abs().max() < 1e-12
    v = value_gamma * (torch.logsumexp(rewards / value_gamma, -1, keepdim=True) - math.log(5))
    a2po_opt = ref + (rewards - v) / gamma
    loss, _ = a2po_loss(a2po_opt, ref, rewards, gamma=gamma, value_gamma=value_gamma)
    assert loss.abs().max() < 1e-24
    assert _grad(a2po_loss, a2po_opt, ref, rewards, gamma=gamma, value_gamma=value_gamma).abs().max() < 1e-12
    # and none of them is stationary at another's optimum
    assert _grad(nca_loss, infonca_opt, ref, rewards, gamma=gamma, alpha=alpha).abs().max() > 1e-3


def test_vcb_max_is_the_hardest_pair_and_the_small_lambda_limit():
    policy, ref, rewards, mask = batch(6, B=6, n=5)
    hardest, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.4, reduction="max")
    for lam in (1e-3, 1e-5):
        lse, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.4, reduction="logsumexp", lam=lam)
        # λ·log(1/K Σ e^{l/λ}) lies in [max - λ log K, max]
        assert (lse <= hardest + 1e-12).all() and (lse >= hardest - lam * math.log(10) - 1e-12).all()


def test_sigma_floor_and_drop():
    """floor: σ_r(x) < floor divides by the floor; drop: such prompts get L = 0, zero gradient,
    and are counted in vcb/frac_dropped; prompts with σ_r(x) ≥ floor are unchanged by either."""
    policy = torch.tensor([[-3.0, -5.0, -4.0], [-2.0, -6.0, -1.0]], dtype=F64)
    ref = torch.full((2, 3), -4.0, dtype=F64)
    rewards = torch.tensor([[0.0, 0.01, 0.02], [0.0, 3.0, 6.0]], dtype=F64)  # σ ≈ 0.0082 and ≈ 2.45
    base, _ = vcb_loss(policy, ref, rewards, gamma=0.5)
    floored, _ = vcb_loss(policy, ref, rewards, gamma=0.5, sigma_floor=0.1)
    want = ref_vcb(policy, ref, rewards, torch.ones(2, 3, dtype=torch.bool), gamma=0.5, sigma_floor=0.1)
    torch.testing.assert_close(floored, want, rtol=1e-12, atol=1e-12)
    assert floored[0] != base[0] and floored[1] == base[1]
    p = policy.clone().requires_grad_()
    dropped, metrics = vcb_loss(p, ref, rewards, gamma=0.5, sigma_floor=0.1, sigma_policy="drop")
    dropped.sum().backward()
    assert dropped[0] == 0 and dropped[1] == base[1] and (p.grad[0] == 0).all() and (p.grad[1] != 0).any()
    assert metrics["vcb/frac_dropped"] == 0.5


def test_batch_std_equals_prompt_std_when_every_prompt_has_the_same_spread():
    policy, ref, _, _ = batch(7, B=4, n=4)
    base = torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=F64)
    rewards = torch.stack([base + 10.0, -base, base.flip(0) - 2.0, base + 0.5])  # equal within-prompt σ
    a, _ = vcb_loss(policy, ref, rewards, gamma=0.3, normalize="batch_std")
    b, _ = vcb_loss(policy, ref, rewards, gamma=0.3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    rewards[3] *= 4  # one prompt spreads more: σ_B moves, every prompt's loss with it
    a2, _ = vcb_loss(policy, ref, rewards, gamma=0.3, normalize="batch_std")
    assert ((a2 - a)[:3].abs() > 1e-6).all()


# --------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.lists(st.floats(-100, 100), min_size=4, max_size=4),
       scale=st.lists(st.floats(1e-2, 1e2), min_size=4, max_size=4),
       normalize=st.sampled_from(["prompt_std", "rank"]), reduction=st.sampled_from(["logsumexp", "mean", "max"]))
def test_prompt_std_and_rank_invariant_to_per_prompt_shift_and_scale(seed, shift, scale, normalize, reduction):
    policy, ref, rewards, mask = batch(seed, B=4, n=5, int_rewards=seed % 2 == 0)
    a, c = torch.tensor(scale, dtype=F64)[:, None], torch.tensor(shift, dtype=F64)[:, None]
    kw = dict(gamma=0.3, normalize=normalize, reduction=reduction)
    base, _ = vcb_loss(policy, ref, rewards, mask, **kw)
    moved, _ = vcb_loss(policy, ref, a * rewards + c, mask, **kw)
    torch.testing.assert_close(moved, base, rtol=1e-8, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), power=st.sampled_from([3, 5]), shift=st.floats(-5, 5))
def test_rank_is_value_free(seed, power, shift):
    """Any increasing transform of the rewards (here (r + c)^odd) leaves normalize="rank" unchanged,
    while prompt_std moves with the values."""
    policy, ref, rewards, mask = batch(seed, B=4, n=5)
    warped = (rewards + shift) ** power
    base, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.3, normalize="rank")
    moved, _ = vcb_loss(policy, ref, warped, mask, gamma=0.3, normalize="rank")
    torch.testing.assert_close(moved, base, rtol=1e-10, atol=1e-12)
    v0, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.3)
    v1, _ = vcb_loss(policy, ref, warped, mask, gamma=0.3)
    assert (v1 - v0).abs().max() > 1e-6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.lists(st.floats(-100, 100), min_size=4, max_size=4),
       scale=st.floats(0.1, 10).filter(lambda a: abs(a - 1) > 0.05))
def test_shift_but_not_scale_invariance(seed, shift, scale):
    """normalize="none", InfoNCA, NCA, A*-PO and ODPO read differences of raw values: a per-prompt
    shift changes nothing, a scale does (the reward scale is their hyper-parameter's business)."""
    policy, ref, rewards, mask = batch(seed, B=4, n=5)
    c = torch.tensor(shift, dtype=F64)[:, None]
    cases = [(vcb_loss, dict(gamma=0.3, normalize="none", eta=1.5))] + [(RELATIVES[k], HP[k]) for k in RELATIVES]
    for fn, kw in cases:
        base, _ = fn(policy, ref, rewards, mask, **kw)
        torch.testing.assert_close(fn(policy, ref, rewards + c, mask, **kw)[0], base, rtol=1e-8, atol=1e-10)
        assert (fn(policy, ref, scale * rewards, mask, **kw)[0] - base).abs().max() > 1e-8, fn.__name__


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.lists(st.floats(-100, 100), min_size=4, max_size=4),
       scale=st.floats(1e-2, 1e2))
def test_batch_std_invariant_to_per_prompt_shift_and_a_common_scale(seed, shift, scale):
    policy, ref, rewards, mask = batch(seed, B=4, n=5)
    c = torch.tensor(shift, dtype=F64)[:, None]
    base, _ = vcb_loss(policy, ref, rewards, mask, gamma=0.3, normalize="batch_std")
    moved, _ = vcb_loss(policy, ref, scale * rewards + c, mask, gamma=0.3, normalize="batch_std")
    torch.testing.assert_close(moved, base, rtol=1e-8, atol=1e-10)


def test_contrastive_relatives_invariant_to_a_per_prompt_log_ratio_constant():
    """InfoNCA and ODPO (and VCB) read only differences of Δπ within a prompt; NCA and A*-PO
    read Δπ itself (absolute likelihoods), so a constant moves them."""
    policy, ref, rewards, mask = batch(8, B=4, n=5)
    c = torch.tensor([[3.0], [-2.0], [0.5], [7.0]], dtype=F64)
    for name in RELATIVES:
        base, _ = RELATIVES[name](policy, ref, rewards, mask, **HP[name])
        moved, _ = RELATIVES[name](policy + c, ref, rewards, mask, **HP[name])
        if name in ("infonca", "odpo"):
            torch.testing.assert_close(moved, base, rtol=1e-10, atol=1e-12)
        else:
            assert (moved - base).abs().max() > 1e-3, name


# --------------------------------------------------------------------------------------------
# Masks, σ = 0, one-candidate prompts: never NaN
# --------------------------------------------------------------------------------------------


CASES = [("vcb", vcb_loss, dict(gamma=0.3) | o) for o in VCB_OPTIONS] + [(k, RELATIVES[k], HP[k]) for k in RELATIVES] + [
    ("odpo-bw", odpo_loss, HP["odpo"] | {"pairs": "best_worst"})]


@pytest.mark.parametrize("name,fn,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -1e30])
def test_padding_changes_nothing_and_gets_zero_gradient(name, fn, kw, garbage):
    policy, ref, rewards, mask = batch(12, B=5, n=4)
    clean, _ = fn(policy, ref, rewards, mask, **kw)
    pad = torch.full((5, 1), garbage, dtype=F64)
    p2 = torch.cat([policy.masked_fill(~mask, garbage), pad], 1).requires_grad_()
    q2, r2 = torch.cat([ref.masked_fill(~mask, garbage), pad], 1), torch.cat([rewards.masked_fill(~mask, garbage), pad], 1)
    m2 = torch.cat([mask, torch.zeros(5, 1, dtype=torch.bool)], 1)
    dirty, metrics = fn(p2, q2, r2, m2, **kw)
    torch.testing.assert_close(dirty, clean, rtol=1e-12, atol=1e-12)
    dirty.sum().backward()
    assert torch.isfinite(p2.grad).all() and (p2.grad[~m2] == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("name,fn,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_one_candidate_empty_and_tied_prompts_are_finite(name, fn, kw, dtype):
    """Prompts with one or no valid candidate: L = 0, zero gradient. All rewards equal (σ = 0),
    in one prompt or in the whole batch (σ_B = 0 too): finite loss and gradient."""
    policy = torch.tensor([[-2.0, 5.0, 7.0], [-3.0, -1.0, 0.0], [-3.0, -5.0, -4.0]], dtype=dtype, requires_grad=True)
    ref = torch.full((3, 3), -4.0, dtype=dtype)
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 0.0], [1.7, 1.7, 1.7]], dtype=dtype)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    loss, metrics = fn(policy, ref, rewards, mask, **kw)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(policy.grad).all()
    assert loss[0] == 0 and loss[1] == 0 and (policy.grad[:2] == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    if fn is vcb_loss and kw.get("sigma_policy") != "drop":  # σ = 0: Eq. 12 with equal rewards pulls Δπ together
        assert loss[2] > 0 and policy.grad[2, 0] > 0 > policy.grad[2, 1]


def test_extreme_values_stay_finite():
    policy = torch.tensor([[-1e4, -1.0, -500.0, -3.0]], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([[-1.0, -1e4, -2.0, -3.0]], dtype=torch.float32)
    rewards = torch.tensor([[1e6, -1e6, 0.0, 1e-30]], dtype=torch.float32)  # ODPO's log gap: 1e-30 - 0
    for name, fn, kw in CASES:
        loss, metrics = fn(policy, ref, rewards, **kw)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(policy.grad).all(), name
        assert all(torch.isfinite(v).all() for v in metrics.values()), name
        policy.grad = None


# --------------------------------------------------------------------------------------------
# Bad hyper-parameters, registry facts, artefact keys
# --------------------------------------------------------------------------------------------


def test_bad_hyperparameters_name_the_value_and_the_allowed_ones():
    p = torch.zeros(2, 3, dtype=F64)
    r = torch.arange(6, dtype=F64).view(2, 3)
    with pytest.raises(ValueError, match="vcb_loss: unknown normalize 'zscore'; allowed: 'prompt_std', 'batch_std', "
                                         "'none', 'rank'"):
        vcb_loss(p, p, r, gamma=0.1, normalize="zscore")
    with pytest.raises(ValueError, match=r"vcb_loss: eta must be a finite number > 0, got -1\.0"):
        vcb_loss(p, p, r, gamma=0.1, normalize="none", eta=-1.0)
    with pytest.raises(ValueError, match=r"vcb_loss: sigma_floor must be a finite number >= 0, got -0\.5"):
        vcb_loss(p, p, r, gamma=0.1, sigma_floor=-0.5)
    with pytest.raises(ValueError, match="unknown sigma_policy 'clip'; allowed: 'floor', 'drop'"):
        vcb_loss(p, p, r, gamma=0.1, sigma_policy="clip")
    with pytest.raises(ValueError, match="unknown reduction 'sum'; allowed: 'logsumexp', 'mean', 'max'"):
        vcb_loss(p, p, r, gamma=0.1, reduction="sum")
    with pytest.raises(ValueError, match=r"sigma_floor=0\.1 with sigma_policy='floor'.*normalize='rank'.*"
                                         "allowed with a floor: 'prompt_std', 'batch_std'"):
        vcb_loss(p, p, r, gamma=0.1, normalize="rank", sigma_floor=0.1)
    for fn, key in ((infonca_loss, "alpha"), (nca_loss, "alpha"), (a2po_loss, "value_gamma")):
        for bad in (0.0, -1.0, float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match=f"{fn.__name__}: {key} must be a finite number > 0, got {bad!r}"):
                fn(p, p, r, gamma=0.1, **{key: bad})
    with pytest.raises(ValueError, match=r"odpo_loss: offset_scale must be a finite number >= 0, got -1\.0"):
        odpo_loss(p, p, r, gamma=0.1, offset_scale=-1.0)
    with pytest.raises(ValueError, match="odpo_loss: unknown pairs 'top'; allowed: 'all', 'best_worst'"):
        odpo_loss(p, p, r, gamma=0.1, pairs="top")
    with pytest.raises(ValueError, match="ref_logps is required"):
        infonca_loss(p, None, r, gamma=0.1)


def test_config_refuses_bad_values_naming_key_value_and_allowed():
    from vcb_lib.config import ConfigError, load_params

    cases = {
        "training.normalize=zscore": r"training\.normalize: expected one of 'prompt_std', 'batch_std', 'none', 'rank', "
                                     r"got 'zscore'",
        "training.eta=-1": r"training\.eta: must be > 0, got -1",
        "training.sigma_policy=clip": r"training\.sigma_policy: expected one of 'floor', 'drop', got 'clip'",
        "training.reduction=sum": r"training\.reduction: expected one of 'logsumexp', 'mean', 'max'",
        "training.alpha=0": r"training\.alpha: must be > 0, got 0",
        "training.value_gamma=-0.5": r"training\.value_gamma: must be > 0, got -0\.5",
        "training.offset_scale=-1": r"training\.offset_scale: must be >= 0, got -1",
        "training.sigma_floor=-0.1": r"training\.sigma_floor: must be >= 0, got -0\.1",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_params(None, [override])
    with pytest.raises(ConfigError, match=r"training\.sigma_floor: 0\.1 with sigma_policy floor .* normalize 'none'"):
        load_params(None, ["training.sigma_floor=0.1", "training.normalize=none"])
    cfg = load_params(None, ["training.sigma_floor=0.1", "training.normalize=rank", "training.sigma_policy=drop"])
    assert (cfg.training.normalize, cfg.training.sigma_policy) == ("rank", "drop")


def test_registry_facts_and_defaults_are_the_papers():
    assert [lt.value for lt in LossType if lt.uses_reward_values] == ["vcb", "infonca", "nca", "a2po", "odpo"]
    assert all(LossType(m).needs_reference and LossType(m).trains_policy for m in RELATIVES)
    assert LossType.VCB.hparams == ("gamma", "lam", "reduction", "normalize", "eta", "sigma_floor", "sigma_policy")
    from vcb_lib.config import TrainingConfig, methods

    t = TrainingConfig()
    assert (t.normalize, t.reduction, t.sigma_floor, t.sigma_policy) == ("prompt_std", "logsumexp", 0.0, "floor")
    assert set(RELATIVES) <= set(methods()) and "bt" not in methods()
    assert t.methods == ["vcb", "dpo", "ipo", "slic", "rrhf", "rest"]  # the default run's list is unchanged


@pytest.mark.parametrize("method", [lt.value for lt in LossType if lt.trains_policy])
def test_artefact_key_holds_exactly_the_methods_own_hyperparameters(method):
    """03_train/<method>/ depends on its own loss hyper-parameters and on no other loss's: changing
    InfoNCA's α retrains InfoNCA only; the folder name carries them."""
    from vcb_lib.config import load_params
    from vcb_lib.stages import artefacts

    cfg = load_params(None)
    # VCB's eta is read only with normalize=none, sigma_policy only with sigma_floor > 0
    inactive = {"eta", "sigma_policy"} if method == "vcb" else set()
    own = (set(LossType(method).hparams) | set(LossType(method).data_hparams)) - inactive  # CUT: + cut_positive
    every = set(artefacts.LOSS_HPARAMS)
    assert {"normalize", "eta", "sigma_floor", "sigma_policy", "alpha", "value_gamma", "offset_scale"} <= every
    in_key = {k.split(".", 1)[1] for k in artefacts.method_key(cfg, method) if k.split(".", 1)[-1] in every}
    assert in_key == own
    name = artefacts.method_dir_name(cfg, method)
    # VCB's options are named only off the paper's default; CUT's judge (a URL, a model path) never is
    named = own - set(artefacts.NAMED_IF_CHANGED) - set(artefacts.NEVER_NAMED)
    assert name.startswith(f"{method}-") and all(f"{k}{getattr(cfg.training, k)}".replace("pairs", "pairs-")
                                                 .replace("reduction", "").replace("cut_", "") in name for k in named)
    if method == "vcb":
        assert name == "vcb-gamma0.05-lam1.0-logsumexp-seed0"  # the paper's settings keep their old folder
        active = load_params(None, {"training.normalize": "none", "training.eta": 2.5,
                                    "training.sigma_floor": 0.2, "training.sigma_policy": "drop"})
        keyed = {k.split(".", 1)[1] for k in artefacts.method_key(active, method) if k.split(".", 1)[-1] in every}
        assert keyed == set(LossType.VCB.hparams)
        assert artefacts.method_dir_name(active, method) == \
            "vcb-gamma0.05-lam1.0-logsumexp-normalizenone-eta2.5-sigma_floor0.2-sigma_policydrop-seed0"
        assert artefacts.method_key(load_params(None, {"training.eta": 3.0}), method) == artefacts.method_key(cfg, method)
