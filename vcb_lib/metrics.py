"""Evaluation metrics of arXiv 2402.16030 (VCB): pure functions on arrays and lists of strings.

* :func:`win_rate` — paired win/tie/lose rates of method A vs B under a (gold) reward, with
  bootstrap CIs over prompts (Sec. 5.2 metric (1), Table 2, Table 5, Figs. 6-7).
* :func:`kl_estimate`, :func:`reward_kl_point` — Monte-Carlo KL(π‖π_sft) and the (reward, KL)
  point of Figure 5 (Sec. 5.8).
* :func:`misalignment` — App. A.5 / Table 6, a thin wrapper over
  :func:`vcb_lib.theory.misalignment_rate`.
* :func:`self_bleu`, :func:`ead`, :func:`distinct_n`, :func:`diversity` — App. A.8 / Table 7.
* :func:`length_stats` — App. A.7 / Figure 8.

The LLM judge (Sec. 5.2 metric (2), Figure 4) is in :mod:`vcb_lib.judge`.

Shapes: N prompts, k samples per prompt. Every function returns plain floats / dicts of floats and
lists (JSON-ready through :func:`vcb_lib.io.write_json`); CIs are ``[lo, hi]`` lists, ``None`` when
``bootstrap=0``.
"""
from __future__ import annotations

import math
import re
from statistics import NormalDist
from typing import Any, Literal, Sequence

import numpy as np

from vcb_lib import theory

__all__ = [
    "bootstrap_mean_ci", "bootstrap_p_value", "distinct_n", "diversity", "ead", "family_wise", "holm", "kl_estimate",
    "length_stats", "misalignment", "ngrams", "power_curve", "resamples_for_level", "reward_kl_point", "self_bleu",
    "tokenize", "win_rate",
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _finite_array(x: Any, name: str, ndims: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """float64 numpy copy of ``x`` (tensor, array, list); loud about emptiness, rank and NaN/inf."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in ndims)}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name} has {bad} NaN/inf value(s); drop or fix those samples first")
    return a


def _as_rows(a: np.ndarray) -> np.ndarray:
    """(N,) -> (N, 1); (N, k) unchanged."""
    return a[:, None] if a.ndim == 1 else a


def _check_ci(ci: float) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def _bootstrap_means(values: np.ndarray, bootstrap: int, seed: int) -> np.ndarray:
    """(bootstrap, m) means of ``values`` (N, m) over prompts resampled with replacement."""
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((bootstrap, values.shape[1]))
    chunk = max(1, 2_000_000 // n)  # bound the (chunk, N) index matrix to ~16 MB
    for start in range(0, bootstrap, chunk):
        m = min(chunk, bootstrap - start)
        idx = rng.integers(0, n, size=(m, n))  # (m, N)
        out[start:start + m] = values[idx].mean(axis=1)  # (m, N, v) -> (m, v)
    return out


def _percentile_ci(samples: np.ndarray, ci: float) -> list[float]:
    lo, hi = np.quantile(samples, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return [float(lo), float(hi)]


def bootstrap_mean_ci(values: Any, *, bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of the mean of per-prompt ``values`` (N,): prompts resampled with
    replacement ``bootstrap`` times with ``numpy.random.default_rng(seed)``. ``None`` if bootstrap=0."""
    v = _finite_array(values, "values", ndims=(1,))
    _check_ci(ci)
    if bootstrap <= 0:
        return None
    return _percentile_ci(_bootstrap_means(v[:, None], bootstrap, seed)[:, 0], ci)


def _se(per_prompt: np.ndarray) -> float:
    """Standard error of the mean over prompts: std(ddof=1)/sqrt(N); NaN for N = 1."""
    n = per_prompt.shape[0]
    return float(per_prompt.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


# --------------------------------------------------------------------------------------------
# Win rate under a reward (Table 2)
# --------------------------------------------------------------------------------------------


def win_rate(scores_a: Any, scores_b: Any, *, bootstrap: int = 1000, seed: int = 0, ci: float = 0.95,
             tie_tol: float = 0.0, pairing: Literal["index", "all"] = "index") -> dict[str, Any]:
    """Paired win rate of method A over method B under one reward (Sec. 5.2 (1), Table 2).

    Args:
        scores_a, scores_b: rewards of A's and B's responses to the same N prompts in the same
            order, shaped (N,) (one response each) or (N, k) (k samples per prompt).
        pairing: how (N, k) inputs are compared. ``"index"`` (default): sample j of A against
            sample j of B, i.e. N·k independent pairs, which estimates P(r_A > r_B) for one
            response of each (what Table 2 reports); needs equal shapes. ``"all"``: every sample
            of A against every sample of B of the same prompt (k_a·k_b pairs per prompt; the same
            expectation, lower variance; k_a may differ from k_b). Samples are NOT averaged per
            prompt first: that would estimate P(mean r_A > mean r_B), a different, sharper number.
        tie_tol: |r_A - r_B| <= tie_tol counts as a tie (default 0: exact equality only).
        bootstrap, seed, ci: percentile bootstrap over prompts (all pairs of a resampled prompt
            travel together), ``numpy.random.default_rng(seed)``; ``bootstrap=0`` skips it.

    Returns: ``win``, ``tie``, ``lose`` (fractions of pairs, summing to 1), ``win_rate`` =
    win + tie/2, ``win_minus_lose``, their CIs ``win_rate_ci`` / ``win_minus_lose_ci`` and
    bootstrap standard errors, ``n_prompts``, ``n_pairs``. Every prompt has the same number of
    pairs, so pair-pooled and prompt-averaged rates coincide.
    """
    a = _as_rows(_finite_array(scores_a, "scores_a"))
    b = _as_rows(_finite_array(scores_b, "scores_b"))
    _check_ci(ci)
    if tie_tol < 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    if pairing == "index":
        if a.shape != b.shape:
            raise ValueError(f"scores_a {np.shape(scores_a)} and scores_b {np.shape(scores_b)} differ in shape; "
                             "pairing='index' compares sample j of A with sample j of B (use pairing='all' for "
                             "different k)")
        diff = a - b  # (N, k)
    elif pairing == "all":
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"scores_a has {a.shape[0]} prompts, scores_b {b.shape[0]}")
        diff = (a[:, :, None] - b[:, None, :]).reshape(a.shape[0], -1)  # (N, ka, kb) -> (N, ka*kb)
    else:
        raise ValueError(f"pairing must be 'index' or 'all', got {pairing!r}")

    win = (diff > tie_tol).mean(axis=1)  # (N,) per-prompt fractions
    lose = (diff < -tie_tol).mean(axis=1)
    tie = 1.0 - win - lose
    per_prompt = np.stack([win + tie / 2, win - lose], axis=1)  # (N, 2)
    out: dict[str, Any] = {
        "win": float(win.mean()), "tie": float(tie.mean()), "lose": float(lose.mean()),
        "win_rate": float(per_prompt[:, 0].mean()), "win_minus_lose": float(per_prompt[:, 1].mean()),
        "n_prompts": int(diff.shape[0]), "n_pairs": int(diff.size),
        "bootstrap": int(bootstrap), "seed": int(seed), "ci": float(ci),
        "win_rate_ci": None, "win_minus_lose_ci": None, "win_rate_se": None, "win_minus_lose_se": None,
    }
    if bootstrap > 0:
        boot = _bootstrap_means(per_prompt, bootstrap, seed)  # (bootstrap, 2)
        out["win_rate_ci"] = _percentile_ci(boot[:, 0], ci)
        out["win_minus_lose_ci"] = _percentile_ci(boot[:, 1], ci)
        out["win_rate_se"] = float(boot[:, 0].std(ddof=1)) if bootstrap > 1 else math.nan
        out["win_minus_lose_se"] = float(boot[:, 1].std(ddof=1)) if bootstrap > 1 else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Reward vs KL (Figure 5)
# --------------------------------------------------------------------------------------------


def kl_estimate(policy_logps: Any, ref_logps: Any) -> dict[str, float]:
    """Monte-Carlo KL(π ‖ π_sft) from responses sampled from π (Sec. 5.8, Figure 5).

    Args: ``policy_logps``, ``ref_logps``: (N,) or (N, k) summed log π(y|x) and log π_sft(y|x)
    of responses y ~ π(·|x) (k samples per prompt).

    Returns ``kl`` = mean of log π(y|x) − log π_sft(y|x) (unbiased for E_x KL(π(·|x)‖π_sft(·|x));
    a single estimate can be negative on few samples and is not clipped), ``kl_se`` = std/sqrt(N)
    of the per-prompt means (with k > 1 the samples of one prompt are averaged first, so the SE
    is over the N independent prompts; NaN for N = 1), ``kl_k3`` = mean of (ρ − 1) − log ρ with
    ρ = π_sft/π (Schulman's non-negative, lower-variance estimator of the same KL), ``n_prompts``,
    ``n_samples``. A policy identical to π_sft gives 0 with SE 0.
    """
    p = _as_rows(_finite_array(policy_logps, "policy_logps"))
    r = _as_rows(_finite_array(ref_logps, "ref_logps"))
    if p.shape != r.shape:
        raise ValueError(f"policy_logps {p.shape} and ref_logps {r.shape} differ in shape")
    log_ratio = p - r  # (N, k) log π/π_sft
    per_prompt = log_ratio.mean(axis=1)  # (N,)
    k3 = np.expm1(-log_ratio) + log_ratio  # (ρ - 1) - log ρ, ρ = exp(-log_ratio)
    return {"kl": float(per_prompt.mean()), "kl_se": _se(per_prompt), "kl_k3": float(k3.mean()),
            "n_prompts": int(p.shape[0]), "n_samples": int(p.size)}


def reward_kl_point(rewards: Any, policy_logps: Any, ref_logps: Any) -> dict[str, float]:
    """One point of Figure 5: mean reward of π's samples and KL(π‖π_sft), with standard errors.

    Args: ``rewards``, ``policy_logps``, ``ref_logps``: (N,) or (N, k), same shape, for responses
    sampled from π. SEs are over prompts (per-prompt means first), as in :func:`kl_estimate`.
    Returns ``mean_reward``, ``reward_se``, ``kl``, ``kl_se``, ``n_prompts``.
    """
    rw = _as_rows(_finite_array(rewards, "rewards"))
    kl = kl_estimate(policy_logps, ref_logps)
    if rw.size != kl["n_samples"] or rw.shape[0] != kl["n_prompts"]:
        raise ValueError(f"rewards {np.shape(rewards)} and log-probs {np.shape(policy_logps)} differ in shape")
    per_prompt = rw.mean(axis=1)
    return {"mean_reward": float(per_prompt.mean()), "reward_se": _se(per_prompt), "kl": kl["kl"],
            "kl_se": kl["kl_se"], "n_prompts": kl["n_prompts"]}


# --------------------------------------------------------------------------------------------
# Misalignment (App. A.5, Table 6)
# --------------------------------------------------------------------------------------------


def misalignment(policy_logps: Any, ref_logps: Any, rewards: Any, mask: Any = None) -> dict[str, float]:
    """Misalignment rate of App. A.5 (Table 6) for k samples per prompt, shaped (N, k) (k = 8 in
    the paper); the counting rules are those of :func:`vcb_lib.theory.misalignment_rate` (reward
    ties form no pair, log-ratio ties count as misaligned).

    Returns ``misalignment_rate`` (pooled over all prompts' pairs, what Table 6 reports),
    ``per_prompt_mean`` (mean of the per-prompt rates over prompts that have a pair) and
    ``n_prompts_with_pairs``. NaN rates when no prompt has a pair.
    """
    pooled, per_prompt = theory.misalignment_rate(policy_logps, ref_logps, rewards, mask, per_prompt=True)
    has_pairs = np.isfinite(per_prompt)
    return {"misalignment_rate": float(pooled),
            "per_prompt_mean": float(per_prompt[has_pairs].mean()) if has_pairs.any() else math.nan,
            "n_prompts_with_pairs": int(has_pairs.sum())}


# --------------------------------------------------------------------------------------------
# Diversity (App. A.8, Table 7)
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str | Sequence[Any]) -> list[Any]:
    """Tokens for distinct-n / EAD: a string becomes its lowercased words and single punctuation
    marks (regex ``\\w+|[^\\w\\s]``); a sequence (e.g. generated token ids) is used as is."""
    if isinstance(text, str):
        return _WORD.findall(text.lower())
    return list(text)


def ngrams(tokens: Sequence[Any], n: int) -> list[tuple]:
    """The len(tokens) − n + 1 contiguous n-grams of one text (none if it is shorter than n)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _corpus_ngrams(texts: Sequence[str | Sequence[Any]], n: int) -> list[tuple]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of texts, not one string")
    if len(texts) == 0:
        raise ValueError("texts is empty")
    grams = [g for t in texts for g in ngrams(tokenize(t), n)]
    if not grams:
        raise ValueError(f"the texts contain no {n}-gram")
    return grams


def distinct_n(texts: Sequence[str | Sequence[Any]], n: int = 1) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / total n-grams, pooled over ``texts``.

    n-grams do not cross text boundaries; strings are tokenised by :func:`tokenize`.
    Biased towards short corpora (it falls as the corpus grows); :func:`ead` corrects that.
    """
    grams = _corpus_ngrams(texts, n)
    return len(set(grams)) / len(grams)


def ead(texts: Sequence[str | Sequence[Any]], n: int = 1, *, vocab_size: int) -> float:
    """Expectation-Adjusted Distinct (App. A.8, Table 7), from Liu et al. 2022, "Rethinking and
    Refining the Distinct Metric" (ACL 2022):

        EAD = N_distinct / (V · [1 − ((V − 1)/V)^C])

    with N_distinct the number of distinct n-grams, C the total number of n-grams in ``texts``
    (pooled; n-grams do not cross text boundaries) and V = ``vocab_size``. The denominator is the
    expected number of distinct items when C items are drawn uniformly from V, so EAD does not
    shrink just because the corpus is longer, as distinct-n does.

    V must be given: Liu et al. recommend, for methods built on pretrained models, the
    tokenizer's vocabulary size (the largest among the compared models); use the same V for every
    method compared. It should match the units counted: pass generated token ids (sequences, used
    as is) with V = ``len(tokenizer)``, or strings (lowercased word tokens, :func:`tokenize`)
    with V = a word-vocabulary size. For n > 1 the same V is used, as in the common
    implementations (not V**n).
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    grams = _corpus_ngrams(texts, n)
    v, c = float(vocab_size), len(grams)
    expected = v * -math.expm1(c * math.log1p(-1.0 / v))  # V·[1 − ((V−1)/V)^C], stable for large V
    return len(set(grams)) / expected


def _bleu(n: int, smooth_method: str, smooth_value: float | None, tokenize_: str, lowercase: bool):
    from sacrebleu.metrics import BLEU

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return BLEU(max_ngram_order=n, effective_order=True, smooth_method=smooth_method, smooth_value=smooth_value,
                tokenize=tokenize_, lowercase=lowercase)


def self_bleu(texts_per_prompt: Sequence[Sequence[str]], n: int = 2, *, smooth_method: str = "floor",
              smooth_value: float | None = 0.1, bleu_tokenizer: str = "13a", lowercase: bool = False) -> float:
    """Self-BLEU-n (Zhu et al. 2018, Texygen) within each prompt's group of samples (App. A.8,
    Table 7 "BLEU-2", "BLEU-3"; lower = more diverse).

    For each prompt's k >= 2 samples, each sample is scored by sentence BLEU against the other
    k − 1 samples as references; the k scores are averaged, then the prompts are averaged (equal
    weight per prompt).

    BLEU is sacrebleu's (``sacrebleu.metrics.BLEU(max_ngram_order=n, effective_order=True)``):
    uniform weights over 1..n-grams, brevity penalty against the closest reference length,
    sacrebleu's ``13a`` tokenisation (``bleu_tokenizer``), case-sensitive unless ``lowercase``;
    effective order (a hypothesis shorter than n uses its available orders only). Smoothing:
    ``floor`` with 0.1 (Chen & Cherry method 1 = NLTK ``SmoothingFunction().method1``, which
    Texygen's Self-BLEU uses): an n-gram order without matches gets precision 0.1/total instead of
    0. Without any unigram match the score is 0 (sacrebleu returns 0 then, whatever the smoothing).

    Scale: 0–1 (sacrebleu's 0–100 divided by 100), like Table 7 (SFT BLEU-2 = 0.406): identical
    samples give 1, samples sharing no token give 0.
    """
    if isinstance(texts_per_prompt, str) or any(isinstance(g, str) for g in texts_per_prompt):
        raise TypeError("texts_per_prompt must be a list of groups (lists of samples), one per prompt")
    if len(texts_per_prompt) == 0:
        raise ValueError("texts_per_prompt is empty")
    small = [i for i, g in enumerate(texts_per_prompt) if len(g) < 2]
    if small:
        raise ValueError(f"Self-BLEU needs >= 2 samples per prompt; prompts {small[:5]} have fewer")
    bleu = _bleu(n, smooth_method, smooth_value, bleu_tokenizer, lowercase)
    per_prompt = []
    for group in texts_per_prompt:
        scores = [bleu.sentence_score(hyp, [r for j, r in enumerate(group) if j != i]).score
                  for i, hyp in enumerate(group)]
        per_prompt.append(sum(scores) / len(scores))
    return float(np.mean(per_prompt)) / 100.0


def diversity(texts_per_prompt: Sequence[Sequence[str | Sequence[Any]]], *, vocab_size: int,
              bleu_texts: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """The Table 7 row for one method: k samples per prompt (k = 8 at temperature 1 in A.8).

    ``ead`` is the mean over prompts of the EAD of each prompt's group (diversity among samples
    of one prompt, like Self-BLEU); ``ead_pooled`` pools every response of every prompt (the
    paper's "for all responses" can be read either way). ``distinct_1``/``distinct_2`` are
    per-prompt means too. Self-BLEU needs strings: give ``bleu_texts`` when ``texts_per_prompt``
    holds token ids.
    """
    groups = list(texts_per_prompt)
    bleu_groups = groups if bleu_texts is None else list(bleu_texts)
    return {
        "ead": float(np.mean([ead(g, 1, vocab_size=vocab_size) for g in groups])),
        "ead_pooled": ead([t for g in groups for t in g], 1, vocab_size=vocab_size),
        "distinct_1": float(np.mean([distinct_n(g, 1) for g in groups])),
        "distinct_2": float(np.mean([distinct_n(g, 2) for g in groups])),
        "self_bleu_2": self_bleu(bleu_groups, 2),
        "self_bleu_3": self_bleu(bleu_groups, 3),
    }


# --------------------------------------------------------------------------------------------
# Length (App. A.7, Figure 8)
# --------------------------------------------------------------------------------------------


def length_stats(token_counts: Any) -> dict[str, float]:
    """Response-length summary for Figure 8's boxplots: ``token_counts`` any shape (e.g. (N, k)),
    flattened. Returns n, mean, std, min, q1, median, q3, max (numpy linear-interpolated quartiles)."""
    a = _finite_array(token_counts, "token_counts", ndims=(0, 1, 2, 3)).ravel()
    if (a < 0).any():
        raise ValueError("token_counts must be >= 0")
    q1, med, q3 = np.quantile(a, [0.25, 0.5, 0.75])
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "q1": float(q1), "median": float(med), "q3": float(q3), "max": float(a.max())}


# --------------------------------------------------------------------------------------------
# Paired estimates on a shared candidate pool drawn from π_sft
# --------------------------------------------------------------------------------------------
#
# P held-out prompts, m candidates each, sampled once from π_sft; every policy is scored by its
# log π on the same candidates, so no policy samples and most of the prompt-to-prompt variance
# cancels in paired differences.

ESS_MIN_FRACTION = 0.98  # the pool is valid for a policy whose mean ESS per prompt is >= this share of m: the
# smallest share at which the pool's 95% CI still covered E_π[r] in >= 90% of replicates on the exact tier (m = 6,
# 144 prompts; vcb_lib.estimators, README "Are the estimators right?"); 0.1 used to be guessed, and could not fire
MDE_FACTOR = 2.8  # minimum detectable effect = 2.8 SE: 80% power at two-sided alpha = 0.05


def snis(policy_logps: Any, ref_logps: Any, rewards: Any) -> tuple[np.ndarray, np.ndarray]:
    """Self-normalised importance sampling of E_π[r | x] per prompt from candidates drawn from π_sft.

    Args: ``policy_logps``, ``ref_logps`` (log π_sft), ``rewards``: (P, m), finite.
    Returns ``(estimate, ess)``, each (P,): estimate_x = Σ_j w_j r_j / Σ_j w_j with
    w_j = π(y_j|x)/π_sft(y_j|x) (computed from log-ratios shifted by their max, so no overflow), and
    the effective sample size (Σ w)² / Σ w² in [1, m] (m when π = π_sft). The estimate is
    consistent (bias O(1/m)) but only informative while π stays near π_sft: a small ESS means few
    candidates carry the weight.
    """
    lp = _as_rows(_finite_array(policy_logps, "policy_logps"))
    ref = _as_rows(_finite_array(ref_logps, "ref_logps"))
    r = _as_rows(_finite_array(rewards, "rewards"))
    if not lp.shape == ref.shape == r.shape:
        raise ValueError(f"shapes differ: policy_logps {lp.shape}, ref_logps {ref.shape}, rewards {r.shape}")
    log_w = lp - ref
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))  # (P, m), max 1 per prompt
    estimate = (w * r).sum(1) / w.sum(1)
    ess = w.sum(1) ** 2 / (w ** 2).sum(1)
    return estimate, ess


def pool_estimate(policy_logps: Any, ref_logps: Any, rewards: Any, *, bootstrap: int = 1000, seed: int = 0,
                  ci: float = 0.95) -> dict[str, Any]:
    """E_π[r] over the pool's prompts (:func:`snis`) with a bootstrap CI over prompts, and the ESS.
    ``per_prompt`` (P,) is kept for paired differences and ``ess`` (P,) for the validity check (not JSON)."""
    est, ess = snis(policy_logps, ref_logps, rewards)
    m = np.shape(_as_rows(np.asarray(rewards, dtype=np.float64)))[1]
    return {"mean": float(est.mean()), "ci": bootstrap_mean_ci(est, bootstrap=bootstrap, seed=seed, ci=ci),
            "ess_mean": float(ess.mean()), "ess_min": float(ess.min()),
            "ess_flag": bool(ess.mean() < ESS_MIN_FRACTION * m), "per_prompt": est, "ess": ess}


def paired_difference(per_prompt_a: Any, per_prompt_b: Any, *, bootstrap: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> dict[str, Any]:
    """Mean of the per-prompt differences a - b (both (P,), same prompts in the same order), its
    percentile bootstrap CI over prompts, ``resolved`` (the CI excludes 0), and the minimum
    detectable effect at this many prompts (``MDE_FACTOR`` × the bootstrap SE)."""
    a = _finite_array(per_prompt_a, "per_prompt_a", ndims=(1,))
    b = _finite_array(per_prompt_b, "per_prompt_b", ndims=(1,))
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same prompts: shapes {a.shape} and {b.shape}")
    d = a - b
    _check_ci(ci)
    if bootstrap <= 0:
        return {"diff": float(d.mean()), "ci": None, "resolved": False, "mde": None}
    means = _bootstrap_means(d[:, None], bootstrap, seed)[:, 0]
    lo, hi = _percentile_ci(means, ci)
    return {"diff": float(d.mean()), "ci": [lo, hi], "resolved": bool(lo > 0 or hi < 0),
            "mde": float(MDE_FACTOR * means.std(ddof=1))}


TAIL_RESAMPLES = 50  # a percentile bootstrap at any level keeps at least this many resamples beyond each bound


def resamples_for_level(ci: float, bootstrap: int = 1000) -> int:
    """Bootstrap resamples for a two-sided percentile interval at level ``ci``: ``bootstrap``, raised
    so that each tail, a share (1 − ci)/2 of them, holds at least :data:`TAIL_RESAMPLES` (a Bonferroni
    level 1 − 0.05/7 needs 14,000; 1000 resamples would leave about 4 in each tail, and the bound would
    be one of them)."""
    _check_ci(ci)
    return max(int(bootstrap), math.ceil(TAIL_RESAMPLES / ((1 - ci) / 2) - 1e-9))


def bootstrap_p_value(values: Any, *, bootstrap: int = 1000, seed: int = 0) -> float:
    """Two-sided percentile-bootstrap p-value of "the mean of ``values`` (N,) is 0": twice the share of
    resampled means on the far side of 0 (ties at 0 count half), capped at 1. It inverts the
    percentile CI: the CI at level 1 − a excludes 0 exactly when p < a (up to the quantiles'
    interpolation). Resolution 2/bootstrap: give ``resamples_for_level`` of the strictest level tested."""
    v = _finite_array(values, "values", ndims=(1,))
    means = _bootstrap_means(v[:, None], bootstrap, seed)[:, 0]
    below, at = float((means < 0).mean()), float((means == 0).mean())
    return min(1.0, 2 * min(below + at / 2, 1 - below - at / 2))


def holm(p_values: dict[str, float], *, alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Holm's step-down procedure (Holm 1979) over m comparisons: sort the p-values, p_(1) ≤ … ≤ p_(m);
    reject H_(1), …, H_(j) while p_(j) ≤ α/(m − j + 1), stop at the first that is not. It controls the
    family-wise error (the chance of any false "resolved") at α, and rejects everything Bonferroni does.

    Returns per name ``p``, ``p_holm`` = max_{i ≤ j} min(1, (m − i + 1) p_(i)) (the adjusted p-value:
    rejected iff ≤ α), ``level`` = 1 − α/(m − j + 1), the confidence level its step tests (its CI at
    that level must exclude 0), and ``resolved`` (rejected)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, out, going = len(order), 0.0, {}, True
    for j, name in enumerate(order):
        p = float(p_values[name])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of {name!r} must be in [0, 1], got {p}")
        running = max(running, min(1.0, (m - j) * p))
        going = going and p <= alpha / (m - j)
        out[name] = {"p": p, "p_holm": running, "level": 1 - alpha / (m - j), "resolved": going}
    return out


def family_wise(differences: dict[str, Any], *, alpha: float = 0.05, bootstrap: int = 1000,
                seed: int = 0) -> dict[str, dict[str, Any]]:
    """Paired comparisons made together, resolved with the family-wise error controlled at ``alpha``
    by :func:`holm`: per name (``differences``: its per-prompt differences a − b, (P,)), the mean
    ``diff``, the percentile-bootstrap p-value (:func:`bootstrap_p_value`, over prompts) and Holm's
    verdict. Every comparison uses :func:`resamples_for_level` of the strictest Holm level,
    1 − alpha/m (≥ 50 resampled means beyond it), and the same seed. ``resolved_alone`` = p ≤ alpha
    (the comparison alone, uncorrected)."""
    m = len(differences)
    if m == 0:
        return {}
    n_boot = resamples_for_level(1 - alpha / m, bootstrap)
    diffs = {k: _finite_array(v, f"differences[{k!r}]", ndims=(1,)) for k, v in differences.items()}
    p = {k: bootstrap_p_value(d, bootstrap=n_boot, seed=seed) for k, d in diffs.items()}
    return {k: {"diff": float(diffs[k].mean()), "resolved_alone": v["p"] <= alpha, "bootstrap": n_boot, **v}
            for k, v in holm(p, alpha=alpha).items()}


def _pair_gaps(policy_logps: np.ndarray, ref_logps: np.ndarray, rewards: np.ndarray, gamma: float):
    """Per prompt with reward spread: x = (r_i - r_j)/σ_r(x), y = γ(Δ_i - Δ_j) over pairs i < j."""
    P, m = rewards.shape
    i, j = np.triu_indices(m, 1)
    sigma = rewards.std(axis=1)  # population std, as Eq. 10
    keep = sigma > 1e-12 * np.maximum(1.0, np.abs(rewards).max(axis=1))
    delta = policy_logps - ref_logps
    x = (rewards[:, i] - rewards[:, j]) / np.where(keep, sigma, 1.0)[:, None]  # (P, pairs)
    y = gamma * (delta[:, i] - delta[:, j])
    return x[keep], y[keep], int(keep.sum())


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's ρ needs)."""
    ranks = np.empty(len(v))
    ranks[np.argsort(v, kind="stable")] = np.arange(len(v), dtype=np.float64)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def calibration(policy_logps: Any, ref_logps: Any, rewards: Any, gamma: float, *, bootstrap: int = 1000,
                seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """The paper's mechanism (Eq. 12) measured on candidate pairs: regress the log-ratio gap
    y = γ(Δπ_i − Δπ_j), Δπ = log π − log π_sft, on the normalised reward gap x = (r_i − r_j)/σ_r(x),
    over every pair i < j of every prompt. VCB's optimum (Eq. 17) is y = x: slope 1, R² 1.

    Regression through the origin (pairs have no orientation: swapping i and j flips both signs):
    slope = Σxy / Σx², R² = 1 − Σ(y − slope·x)² / Σy², Spearman ρ(x, y). CIs: percentile bootstrap
    over prompts (a prompt's pairs travel together). Prompts whose rewards are all equal (σ_r = 0)
    have no gap to calibrate to and are left out (``prompts_used``); when none is left the result is
    degenerate: ``slope`` None and ``degenerate`` says why (never NaN).

    Args: (P, m) arrays, finite; ``gamma`` > 0 (γ of Eq. 9, the trained one).
    """
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    lp = _as_rows(_finite_array(policy_logps, "policy_logps"))
    ref = _as_rows(_finite_array(ref_logps, "ref_logps"))
    r = _as_rows(_finite_array(rewards, "rewards"))
    if not lp.shape == ref.shape == r.shape:
        raise ValueError(f"shapes differ: policy_logps {lp.shape}, ref_logps {ref.shape}, rewards {r.shape}")
    x, y, used = _pair_gaps(lp, ref, r, gamma)  # (P', pairs)
    out: dict[str, Any] = {"prompts_used": used, "pairs": int(x.size)}
    if used == 0 or x.shape[1] == 0:
        return out | {"slope": None, "slope_ci": None, "r2": None, "spearman": None, "spearman_ci": None,
                      "degenerate": "no prompt has two candidates with different rewards: nothing to calibrate to"}
    sxy, sxx, syy = (x * y).sum(1), (x * x).sum(1), (y * y).sum(1)  # (P',)
    slope = float(sxy.sum() / sxx.sum())
    resid = syy.sum() - 2 * slope * sxy.sum() + slope ** 2 * sxx.sum()
    r2 = float(1 - resid / syy.sum()) if syy.sum() > 0 else None  # y = 0 everywhere (π = π_sft): R² undefined
    rho = _spearman(x.ravel(), y.ravel())
    out |= {"slope": slope, "r2": r2, "spearman": None if math.isnan(rho) else rho, "slope_ci": None, "spearman_ci": None}
    if bootstrap > 0:
        _check_ci(ci)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, used, size=(bootstrap, used))  # (bootstrap, P')
        slopes = sxy[idx].sum(1) / np.maximum(sxx[idx].sum(1), 1e-300)
        out["slope_ci"] = _percentile_ci(slopes, ci)
        rhos = np.array([_spearman(x[k].ravel(), y[k].ravel()) for k in idx[: min(bootstrap, 400)]])
        rhos = rhos[np.isfinite(rhos)]
        out["spearman_ci"] = _percentile_ci(rhos, ci) if len(rhos) else None
    return out


# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (beyond: 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean over training seeds (one value per seed), their SD and the 95% t interval of the mean
    (``ci_seeds``; None for one seed), ``resolved_seeds`` when it excludes 0."""
    v = _finite_array(list(values), "values", ndims=(1,))
    k, mean = len(v), float(v.mean())
    if k < 2:
        return {"mean": mean, "sd_seeds": None, "ci_seeds": None, "resolved_seeds": False}
    sd = float(v.std(ddof=1))
    half = (_T975[k - 2] if k - 1 <= len(_T975) else 1.96) * sd / math.sqrt(k)
    return {"mean": mean, "sd_seeds": sd, "ci_seeds": [mean - half, mean + half],
            "resolved_seeds": bool(mean - half > 0 or mean + half < 0)}


def _snis_within_variance(policy_a: np.ndarray, policy_b: np.ndarray, ref: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(P,) delta-method variance of one prompt's SNIS difference a − b on its m shared candidates:
    m/(m−1) Σ_j (ŵ^a_j (r_j − μ̂^a) − ŵ^b_j (r_j − μ̂^b))², ŵ the self-normalised weights (the
    standard SNIS variance estimate, Owen 2013 §9.2, for a paired difference). It shrinks as 1/m."""
    m = r.shape[1]
    terms = []
    for lp in (policy_a, policy_b):
        log_w = lp - ref
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w /= w.sum(1, keepdims=True)  # (P, m), rows sum to 1
        terms.append(w * (r - (w * r).sum(1, keepdims=True)))
    return m / (m - 1) * ((terms[0] - terms[1]) ** 2).sum(1)


def power_curve(policy_a: Any, policy_b: Any, ref_logps: Any, rewards: Any, *, prompts: Sequence[int] = (),
                candidates: Sequence[int] = (), repeats: int = 200, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """How the paired pool difference a − b (:func:`snis` per prompt) would tighten with more prompts
    or more candidates per prompt: the CI half-width z·√(V/P) of the mean of P per-prompt differences
    whose variance across prompts is V.

    * Fewer candidates (m' < m) are measured: V(m') is the mean over ``repeats`` random draws of m' of
      each prompt's candidates (the same draw for a and b, so the pair stays paired).
    * More candidates (k > m) are predicted: V splits into the spread of the prompts' true
      differences, s²_prompts, and the sampling noise of each prompt's estimate, s²_candidates/m,
      estimated by the delta method on this pool (:func:`_snis_within_variance`); then
      V(k) = V(m) − s²_candidates (1/m − 1/k). SNIS's O(1/m) bias toward no difference is ignored;
      in simulation (tests) the prediction for 2m and 4m came within 5-16% of the truth, on the low side.
    * Prompts are independent, so P' prompts give exactly z·√(V/P'): more prompts need no model.

    Args: (P, m) arrays as :func:`snis`, P ≥ 2, m ≥ 2; ``prompts``/``candidates``: the grid to report
    (default: P prompts; m' = 2..m, 2m and 4m candidates).
    Returns ``{"measured": [{"candidates", "variance"}], "fit": {"s2_prompts", "s2_candidates"},
    "grid": [{"prompts", "candidates", "half_width", "measured"}]}``.
    """
    a = _as_rows(_finite_array(policy_a, "policy_a"))
    b = _as_rows(_finite_array(policy_b, "policy_b"))
    ref = _as_rows(_finite_array(ref_logps, "ref_logps"))
    r = _as_rows(_finite_array(rewards, "rewards"))
    if not a.shape == b.shape == ref.shape == r.shape:
        raise ValueError(f"shapes differ: policy_a {a.shape}, policy_b {b.shape}, ref_logps {ref.shape}, rewards {r.shape}")
    P, m = r.shape
    if P < 2 or m < 2:
        raise ValueError(f"a power curve needs >= 2 prompts and >= 2 candidates per prompt, got {P} x {m}")
    _check_ci(ci)
    if any(k < 2 for k in candidates) or any(p_ < 2 for p_ in prompts):
        raise ValueError(f"the grid needs >= 2 prompts and >= 2 candidates, got prompts {list(prompts)}, "
                         f"candidates {list(candidates)} (with 1 candidate every policy's estimate is that candidate's reward)")
    z = NormalDist().inv_cdf(0.5 + ci / 2)
    rng = np.random.default_rng(seed)
    rows = np.arange(P)[:, None]
    measured = []
    for k in range(2, m + 1):
        v = []
        for _ in range(repeats if k < m else 1):
            pick = np.argsort(rng.random((P, m)), axis=1)[:, :k]  # (P, k): a random subset per prompt
            d = snis(a[rows, pick], ref[rows, pick], r[rows, pick])[0] - snis(b[rows, pick], ref[rows, pick], r[rows, pick])[0]
            v.append(d.var(ddof=1))
        measured.append({"candidates": k, "variance": float(np.mean(v))})
    v_m = measured[-1]["variance"]
    s2_c = float(m * _snis_within_variance(a, b, ref, r).mean())
    s2_p = max(v_m - s2_c / m, 0.0)
    grid = []
    for p_ in (prompts or (P,)):
        for k in (candidates or (*range(2, m + 1), 2 * m, 4 * m)):
            v = measured[k - 2]["variance"] if k <= m else max(v_m - s2_c * (1.0 / m - 1.0 / k), 0.0)
            grid.append({"prompts": int(p_), "candidates": int(k), "half_width": float(z * math.sqrt(v / p_)),
                         "measured": bool(k <= m and p_ <= P)})
    return {"measured": measured, "fit": {"s2_prompts": s2_p, "s2_candidates": s2_c}, "grid": grid}
