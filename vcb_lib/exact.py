"""Exact metrics on an enumerable response space (the exact task, ``vcb_lib.tasks.exact``).

When every response to a prompt can be listed — all |V|^L token strings of length L, whose
probabilities sum to one under a model whose vocabulary is V — an expectation is a sum, not a
sample mean: E_π[r], KL(π‖π_sft), win rates, the KL-regularised optimum π_opt of Theorem 1 and the
distance of any policy to it are exact numbers (no CI). This module computes them.

Shapes: a policy on P prompts is a table ``logp`` (P, N) of log π(y|x) over the N = |V|^L
responses, in :func:`vcb_lib.tasks.exact.all_responses` order; rewards are (P, N) too; everything
is float64 numpy. :func:`policy_logps` fills such a table from a causal LM by batched forward passes
(|V|^(L-1) rows per prompt: the last position of each row gives all |V| continuations at once)
and checks that each row sums to one.

Each function is one quantity of the paper or of issue #18:

- :func:`expectation`, :func:`kl`, :func:`tv` — E_π[f], KL(π‖ρ), total variation, per prompt;
- :func:`win_rate` — P(r(y) > r(y')), ties, losses for y ~ π, y' ~ ρ (Table 2's metric, exact);
- :func:`optimal_logps` — π_opt ∝ π_sft·e^{r/α(x)} (Theorem 1 through :func:`vcb_lib.theory.optimal_log_policy`);
  with α(x) = γσ_r(x) it is Eq. 15;
- :func:`frontier`, :func:`matched_alpha` — the exact reward-vs-KL frontier of Eq. 2 (one α for
  all prompts) and the α whose optimum has a given KL, to compare a method with the optimum at its KL;
- :func:`eq12_rms` — the Eq. 12 residual (Δ_i − Δ_j) − (r_i − r_j)/(γσ) over all pairs of a set
  of responses (root mean square), weighted uniformly or by π_sft;
- :func:`misalignment_rate` — App. A.5 over all response pairs (the rules of :func:`vcb_lib.theory.misalignment_rate`);
- :func:`outside` — where the mass of the responses outside D_t goes;
- :func:`near_tie` — the Figure 1-like near-tie: the two best responses of each prompt.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import numpy as np
import torch

from vcb_lib import theory
from vcb_lib.logps import encode_pairs, evaluating
from vcb_lib.tasks.exact import all_responses, check_space

NORMALISATION_TOL = 1e-4  # |Σ_y π(y|x) − 1| allowed before the enumeration is declared incomplete


@contextlib.contextmanager
def one_thread():
    """One intra-op torch thread inside (restored after): the exact model's ops are tiny, and on a busy
    2-core machine a second spinning thread made each forward pass ~100x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Enumeration
# --------------------------------------------------------------------------------------------


def policy_logps(model, tokenizer, prompts: Sequence[str], length: int, *, batch_rows: int = 4096) -> np.ndarray:
    """log π(y|x) of every response y of ``length`` tokens over the tokenizer's vocabulary, for each
    prompt: (P, |V|^L) float64, columns in ``all_responses(|V|, length)`` order.

    Per prompt, one forward pass over the |V|^(L-1) prefixes y_<L (prompt + prefix, no padding):
    position t of a row gives log π(y_t | x, y_<t) for every token, so log π(y) = Σ_{t<L-1} of the
    prefix's own tokens + the last position's log-prob of y_L. Raises ``ValueError`` when |V|^L is
    over the cap, or when a row does not sum to one (the model gives mass to ids outside the vocabulary).
    """
    V = len(tokenizer)
    check_space(V, length)
    prefixes = torch.as_tensor(all_responses(V, length - 1) if length > 1 else np.zeros((1, 0), dtype=np.int64))
    device = next(model.parameters()).device
    out = np.empty((len(prompts), V ** length))
    with evaluating(model), one_thread():
        for p, (ids, _) in enumerate(encode_pairs(tokenizer, list(prompts), [[]] * len(prompts))):
            P = len(ids)
            parts = []
            for start in range(0, len(prefixes), batch_rows):
                rows = prefixes[start:start + batch_rows]  # (R, L-1)
                x = torch.cat([torch.tensor(ids).expand(len(rows), P), rows], 1).to(device)  # (R, P+L-1)
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, P - 1:].double()  # (R, L, V')
                lp = torch.log_softmax(logits, -1)
                if lp.shape[-1] != V:  # ids beyond the tokenizer's: their mass is lost to the enumeration
                    lp = lp[..., :V]
                own = lp[:, :-1].gather(-1, rows.to(device)[..., None]).squeeze(-1).sum(-1)  # (R,) log π(y_<L)
                parts.append((own[:, None] + lp[:, -1]).reshape(-1).cpu())  # (R·V,): prefix-major = product order
            out[p] = torch.cat(parts).numpy()
    mass = np.exp(out).sum(1)
    bad = np.flatnonzero(np.abs(mass - 1) > NORMALISATION_TOL)
    if bad.size:
        raise ValueError(f"the {V}^{length} enumerated responses of prompt {prompts[bad[0]]!r} hold {mass[bad[0]]:.6f} of "
                         "its probability, not 1: the model's vocabulary is larger than the tokenizer's, or it can stop early")
    return out


def response_index(responses: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Column of each response (token ids of length L) in the enumeration order: base-|V| digits."""
    ids = np.asarray([list(r) for r in responses], dtype=np.int64)
    return (ids * vocab_size ** np.arange(ids.shape[1] - 1, -1, -1)).sum(1) if ids.size else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Expectations and distances (per prompt: (P, N) -> (P,))
# --------------------------------------------------------------------------------------------


def _probs(logp: np.ndarray) -> np.ndarray:
    return np.exp(logp)


def expectation(logp: np.ndarray, values: np.ndarray) -> np.ndarray:
    """E_{y~π(·|x)}[values(x, y)] per prompt."""
    return (_probs(logp) * values).sum(1)


def kl(logp: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """KL(π(·|x) ‖ ρ(·|x)) = Σ_y π (log π − log ρ) per prompt (0 where π = 0)."""
    p = _probs(logp)
    return np.where(p > 0, p * (logp - ref), 0.0).sum(1)


def tv(logp: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Total variation ½ Σ_y |π − ρ| per prompt."""
    return 0.5 * np.abs(_probs(logp) - _probs(other)).sum(1)


def win_rate(logp: np.ndarray, other: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
    """P(r(y) > r(y')), P(=), P(<) for y ~ π, y' ~ ρ independently, averaged over prompts, and
    ``win_rate`` = win + tie/2 (as :func:`vcb_lib.metrics.win_rate` defines it): the value a sampled
    win rate estimates, with no sampling error."""
    win = tie = 0.0
    for lp, lo, r in zip(logp, other, rewards):
        values, inverse = np.unique(r, return_inverse=True)  # reward levels, ascending
        p, q = np.bincount(inverse, np.exp(lp), len(values)), np.bincount(inverse, np.exp(lo), len(values))
        below = np.concatenate([[0.0], np.cumsum(q)[:-1]])  # ρ(r(y') < level)
        win += float(p @ below)
        tie += float(p @ q)
    P = len(logp)
    win, tie = win / P, tie / P
    return {"win": win, "tie": tie, "lose": 1.0 - win - tie, "win_rate": win + tie / 2}


def reward_std(ref: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """σ_r(x) under π_sft, exact: the population value Eq. 10 estimates from n samples. (P,)"""
    mean = expectation(ref, rewards)
    return np.sqrt(np.maximum(expectation(ref, (rewards - mean[:, None]) ** 2), 0.0))


def optimal_logps(ref: np.ndarray, rewards: np.ndarray, alpha: Any) -> np.ndarray:
    """log π_opt(y|x) = log π_sft + r/α(x) − log Z(x): Theorem 1 (Eq. 5) with β = −log π_sft, through
    :func:`vcb_lib.theory.optimal_log_policy`. ``alpha``: a scalar (Eq. 2's optimum) or (P,)
    (γσ_r(x): Eq. 15)."""
    return theory.optimal_log_policy(rewards, np.broadcast_to(np.asarray(alpha, dtype=np.float64), (len(ref),)),
                                     -ref).numpy()


# --------------------------------------------------------------------------------------------
# The reward-vs-KL frontier (Eq. 2, one α for all prompts)
# --------------------------------------------------------------------------------------------


def _tilted(ref: np.ndarray, rewards: np.ndarray, alpha: float) -> np.ndarray:
    """log of π_sft·e^{r/α} normalised per prompt, in numpy: :func:`optimal_logps` with a scalar α
    (the bisection of :func:`matched_alpha` calls it ~40 times; tests check the two agree)."""
    logits = ref + rewards / alpha
    top = logits.max(1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(1, keepdims=True)))


def frontier_point(ref: np.ndarray, rewards: np.ndarray, alpha: float) -> tuple[float, float]:
    """(mean reward, mean KL) over prompts of π_α ∝ π_sft·e^{r/α}: the optimum of Eq. 2 at γ = α."""
    opt = _tilted(ref, rewards, alpha)
    return float(expectation(opt, rewards).mean()), float(kl(opt, ref).mean())


def frontier(ref: np.ndarray, rewards: np.ndarray, alphas: Sequence[float] | None = None) -> dict[str, list[float]]:
    """The exact frontier: for each α (default 40 values from 0.01 to 100, log-spaced), the mean
    reward and KL(π_α‖π_sft) of Eq. 2's optimum. No policy of the same prompts has more reward at
    the same mean KL."""
    alphas = list(np.logspace(-2, 2, 40) if alphas is None else alphas)
    points = [frontier_point(ref, rewards, a) for a in alphas]
    return {"alpha": [float(a) for a in alphas], "reward": [p[0] for p in points], "kl": [p[1] for p in points]}


def matched_alpha(ref: np.ndarray, rewards: np.ndarray, target_kl: float, *, iters: int = 40) -> float | None:
    """The α whose optimum π_α has mean KL(π_α‖π_sft) = ``target_kl`` (bisection on log α in
    [1e-4, 1e4]; the KL falls as α grows). ``inf`` for a target <= 0 (π_sft itself); None when the
    target is beyond every α's KL (a policy further from π_sft than the optimum ever goes: the
    frontier's reward there is the maximum reward)."""
    if target_kl <= 0:
        return math.inf
    lo, hi = math.log(1e-4), math.log(1e4)  # KL(lo) is the largest
    if frontier_point(ref, rewards, math.exp(lo))[1] < target_kl:
        return None
    for _ in range(iters):
        mid = (lo + hi) / 2
        if frontier_point(ref, rewards, math.exp(mid))[1] > target_kl:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


# --------------------------------------------------------------------------------------------
# Eq. 12, misalignment, D_t's coverage, the near-tie
# --------------------------------------------------------------------------------------------


def eq12_rms(logp: np.ndarray, ref: np.ndarray, rewards: np.ndarray, sigma: np.ndarray, gamma: float,
             weights: np.ndarray | None = None) -> float:
    """Root mean square of Eq. 12's residual (Δ_i − Δ_j) − (r_i − r_j)/(γσ(x)), Δ = log π − log π_sft,
    over the pairs of responses of every prompt: uniform over all pairs when ``weights`` is None,
    else over pairs drawn independently from ``weights`` (P, N) (e.g. π_sft's probabilities).
    With a_y = Δ_y − r_y/(γσ): the mean of (a_i − a_j)² over ordered pairs i ≠ j is 2N/(N−1)·Var(a)
    (uniform), over independent draws 2·Var_w(a). Zero iff π is Eq. 15's optimum on the responses."""
    a = (logp - ref) - rewards / (gamma * sigma[:, None])
    if weights is None:
        N = a.shape[1]
        ms = 2 * N / (N - 1) * a.var(1)
    else:
        w = weights / weights.sum(1, keepdims=True)
        mean = (w * a).sum(1)
        ms = 2 * (w * (a - mean[:, None]) ** 2).sum(1)
    return float(np.sqrt(ms.mean()))


def candidate_eq12_rms(policy: np.ndarray, ref: np.ndarray, rewards: np.ndarray, gamma: float,
                       mask: np.ndarray | None = None) -> float:
    """Root mean square of :func:`vcb_lib.theory.eq12_residual` over the candidate pairs i < j of
    every prompt (B, n) (σ_r from the candidates, Eq. 10: what VCB trains on)."""
    res = theory.eq12_residual(policy, ref, rewards, gamma, mask).numpy()  # (B, n, n)
    n = res.shape[1]
    m = np.ones(res.shape[:2], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)[None] & m[:, :, None] & m[:, None, :]
    return float(np.sqrt((res[upper] ** 2).mean())) if upper.any() else math.nan


def misalignment_rate(logp: np.ndarray, ref: np.ndarray, rewards: np.ndarray) -> float:
    """App. A.5 over every pair of responses of every prompt, pooled: misaligned pairs / pairs with
    different rewards. The counting rules of :func:`vcb_lib.theory.misalignment_rate` (reward ties
    form no pair; a log-ratio tie counts as misaligned), in numpy one prompt at a time, ~10x faster
    on 1296 responses (tests compare the two)."""
    mis = pairs = 0
    for lp, lo, r in zip(logp, ref, rewards):
        ratio = lp - lo
        d_r = r[:, None] - r[None, :]  # (N, N), each unordered pair twice
        eligible = d_r != 0
        aligned = d_r * (ratio[:, None] - ratio[None, :]) > 0
        mis += int((eligible & ~aligned).sum()) // 2
        pairs += int(eligible.sum()) // 2
    return mis / pairs if pairs else math.nan


def outside(logp: np.ndarray, ref: np.ndarray, rewards: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """Where the mass of the responses outside D_t goes (``inside`` (P, N) bool: y is one of x's
    candidates). Means over prompts: ``mass`` Σ_{y∉D_t} π, ``sft_mass`` the same under π_sft,
    ``reward`` E_π[r | y ∉ D_t], ``sft_reward`` under π_sft, ``better_mass`` the mass on responses
    outside D_t whose reward beats every candidate's, ``sft_better_mass``."""
    p, q = np.exp(logp), np.exp(ref)
    out = ~inside
    best = np.where(inside, rewards, -np.inf).max(1, keepdims=True)
    better = out & (rewards > best)
    mass, sft_mass = (p * out).sum(1), (q * out).sum(1)
    return {"mass": float(mass.mean()), "sft_mass": float(sft_mass.mean()),
            "reward": float(((p * out * rewards).sum(1) / np.maximum(mass, 1e-300)).mean()),
            "sft_reward": float(((q * out * rewards).sum(1) / np.maximum(sft_mass, 1e-300)).mean()),
            "better_mass": float((p * better).sum(1).mean()), "sft_better_mass": float((q * better).sum(1).mean())}


def near_tie_pairs(rewards: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns of each prompt's near-tie: y★ = the best response (ties broken by enumeration order)
    and y☆ = the best of y★'s siblings, the responses that differ from it in the last token only."""
    best = rewards.argmax(1)  # the first maximum
    siblings = (best - best % vocab_size)[:, None] + np.arange(vocab_size)  # (P, V) same first L-1 tokens
    sib_r = np.where(siblings == best[:, None], -np.inf, np.take_along_axis(rewards, siblings, 1))
    return best, siblings[np.arange(len(best)), sib_r.argmax(1)]


def near_tie(logp: np.ndarray, ref: np.ndarray, rewards: np.ndarray, sigma: np.ndarray, gamma: float,
             vocab_size: int) -> dict[str, Any]:
    """The Figure 1-like near-tie of every prompt (:func:`near_tie_pairs`; on the exact task y★ ends
    with e, y☆ with f: rewards 0.05 apart). Per prompt: π(y★), π(y☆), the log-ratio gap Δ★ − Δ☆
    against Eq. 12's value (r★ − r☆)/(γσ), and π's distribution of the last token after their shared
    prefix: on y★'s token (``last_best``), y☆'s (``last_second``) and the other tokens
    (``last_other``, the clearly worse responses, like y_1 of Figure 1). (P,) arrays."""
    best, second = near_tie_pairs(rewards, vocab_size)
    rows = np.arange(len(rewards))
    delta = logp - ref
    last = np.exp(logp.reshape(len(logp), -1, vocab_size)[rows, best // vocab_size])  # (P, V) π(prefix, y_L = v)
    last /= last.sum(1, keepdims=True)  # π(y_L = v | x, prefix)
    p_best, p_second = last[rows, best % vocab_size], last[rows, second % vocab_size]
    others = np.ones_like(last, dtype=bool)
    others[rows, best % vocab_size] = others[rows, second % vocab_size] = False
    return {"best": best, "second": second, "p_best": np.exp(logp[rows, best]), "p_second": np.exp(logp[rows, second]),
            "gap": delta[rows, best] - delta[rows, second],
            "target_gap": (rewards[rows, best] - rewards[rows, second]) / (gamma * sigma),
            "last_best": p_best, "last_second": p_second, "last_other": (last * others).sum(1),
            "r_best": rewards[rows, best], "r_second": rewards[rows, second],
            "r_other": (np.take_along_axis(rewards, (best - best % vocab_size)[:, None] + np.arange(vocab_size), 1)
                        * others).sum(1) / others.sum(1)}
