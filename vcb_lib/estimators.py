"""Are stage 04's estimators right? Calibration where the truth is known (issue #30 item 3).

Stage 04 estimates each policy's expected evaluation reward E_π[r] (a mean over prompts) two ways:

* **pool** — m candidates per prompt drawn once from π_sft (temperature 1), re-weighted per prompt by
  self-normalised importance weights w ∝ π/π_sft (:func:`vcb_lib.metrics.snis`); the mean over P
  prompts, a 95% percentile bootstrap CI over prompts (:func:`vcb_lib.metrics.pool_estimate`), and the
  per-prompt effective sample size ESS = (Σw)²/Σw² in [1, m].
* **on-policy** — k samples per prompt from π itself; the mean of the per-prompt mean rewards with the
  same bootstrap CI over prompts (stage 04 reports it as mean ± SE over prompts,
  :func:`vcb_lib.metrics.reward_kl_point`; the percentile CI is ≈ ± 1.96 SE).

This module adds a third, **combined**: the pool's SNIS estimate c_x corrected by an on-policy,
exactly unbiased estimate of its error (a doubly-robust / control-variate form). With U_x the distinct
pool candidates of prompt x, whose π(y|x) and r(x, y) the pool already holds, and y_j ~ π(·|x):

    Ê_x = c_x + Σ_{y∈U_x} π(y|x)(r(x, y) − c_x) + (1/k) Σ_j (r(x, y_j) − c_x)·[y_j ∉ U_x]

Given the pool, the last two terms estimate E_π[r − c_x | x] without bias (the first exactly, the
second by sampling the rest of the space), so E[Ê_x] = E_π[r | x] at any distance from π_sft, however
biased c_x is; the CI is the same bootstrap over prompts of the per-prompt Ê_x. It is narrower than
on-policy where the pool's candidates hold much of π's mass or c_x is close to π's mean outside them.
It needs π's log-probs of complete responses on the pool (stage 04 computes them) and the same sample
space for both draws (same length cap, T = 1, top-p = 1); on long free-text responses π(U_x) ≈ 0 and
it is the on-policy mean recentred by c_x.

On an enumerable task (the exact tier, :mod:`vcb_lib.tasks.exact`) E_π[r], KL(π‖π_sft) and π_opt
(Eq. 15) are exact, so :func:`simulate` draws R independent pools and on-policy samples and
:func:`calibrate` measures each estimator's bias, RMSE, CI coverage and half-width against the truth;
:func:`derive_threshold` turns the pool's coverage-vs-ESS into the validity rule
:func:`pool_valid` / :data:`POOL_ESS_MIN_FRACTION` (README, "Are the estimators right? (exact tier)";
``python bench/estimator_calibration.py`` reproduces the table).

Shapes: P prompts, N enumerated responses per prompt, R replicates; log-probs and rewards (P, N)
float64, log-probs normalised per prompt (each row's exp sums to 1). Pure numpy (only :func:`exact_case`
builds its tables through :mod:`vcb_lib.exact`); seeded, deterministic.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from vcb_lib.metrics import ESS_MIN_FRACTION, _bootstrap_means, snis

__all__ = ["ESTIMATORS", "GAMMAS", "POOL_COVERAGE_TARGET", "POOL_ESS_MIN_FRACTION", "calibrate", "derive_threshold", "draw",
           "exact_case", "pool_valid", "replicate", "simulate", "table"]

ESTIMATORS = ("pool", "on_policy", "combined")
POOL_COVERAGE_TARGET = 0.9  # the pool's 95% CI must cover the truth at least this often where pool_valid accepts it

# The smallest mean per-prompt ESS, as a fraction of m, at which the pool's 95% CI still covered the exact E_π[r]
# in >= 90% of the replicates it accepts, for every policy tested: derive_threshold (step 0.01) on the exact tier,
# π_sft = the task's target, policies π_opt of Eq. 15 at γ from 20 down to 0.02, m = 6, k = 2, R = 400, P = 24 and
# P = 144 prompts (README "Are the estimators right? (exact tier)"; bench/estimator_calibration.py). P = 144, the
# default run's pool size (138 prompts x 6), sets it (P = 24 alone gives 0.86; m = 16 at P = 144 gives 0.92): SNIS's
# bias, O(1/m), does not shrink with P while the CI does, so more prompts need a policy closer to π_sft. It is
# conservative for fewer prompts or more candidates, not for more than ~150 prompts or fewer than 6 candidates.
POOL_ESS_MIN_FRACTION = ESS_MIN_FRACTION  # 0.98, derived here (derive_threshold); metrics.pool_estimate's ess_flag reads it


def pool_valid(ess_per_prompt: Any, m: int, fraction: float = POOL_ESS_MIN_FRACTION) -> bool:
    """Is a policy's pool estimate (SNIS over m candidates per prompt from π_sft) trustworthy?

    True when the mean per-prompt ESS (:func:`vcb_lib.metrics.snis`'s second output, (P,)) is at least
    ``fraction``·m. With the default :data:`POOL_ESS_MIN_FRACTION` its 95% CI covered the exact value in
    >= 90% of replicates wherever this returned True on the exact tier (module docstring); when False, use
    the on-policy (or :func:`replicate`'s combined) estimate for that policy. π_sft itself has ESS = m:
    always valid. On the exact tier at m = 6 this accepts only policies within KL ≈ 0.005 nats of π_sft:
    SNIS over 6 candidates underestimates a tilted policy's reward by ~15% of its gain already at KL 0.1.
    """
    ess = np.asarray(ess_per_prompt, dtype=np.float64).ravel()
    if ess.size == 0 or not np.isfinite(ess).all():
        raise ValueError(f"ess_per_prompt must be a non-empty finite array, got shape {np.shape(ess_per_prompt)}")
    if m < 1:
        raise ValueError(f"m must be >= 1 candidates per prompt, got {m}")
    return bool(ess.mean() >= fraction * m * (1 - 1e-12))  # ESS = m exactly at π = π_sft


# --------------------------------------------------------------------------------------------
# One replicate
# --------------------------------------------------------------------------------------------


def _cdf(logp: np.ndarray) -> np.ndarray:
    """(..., P, N) cumulative probabilities per prompt, last column exactly 1."""
    c = np.cumsum(np.exp(logp - logp.max(-1, keepdims=True)), axis=-1)
    return c / c[..., -1:]


def _draw_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from per-prompt CDFs (P, N) with uniforms (P, n): column indices (P, n)."""
    P, N = cdf.shape
    offset = np.arange(P, dtype=np.float64)[:, None]
    flat = (cdf + offset).ravel()  # row p spans (p, p + 1]: one sorted array for every prompt
    idx = np.searchsorted(flat, (u + offset).ravel(), side="right").reshape(u.shape) - np.arange(P)[:, None] * N
    return np.clip(idx, 0, N - 1)


def draw(logp: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Column indices (P, n) of responses y ~ π(·|x) per prompt, from ``logp`` (P, N) and uniforms
    ``u`` (P, n) in [0, 1) (inverse CDF: the same ``u`` gives the same draw)."""
    return _draw_cdf(_cdf(logp), u)


def replicate(ref: np.ndarray, policies: np.ndarray, rewards: np.ndarray, u_pool: np.ndarray,
              u_policy: np.ndarray, *, cdfs: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-prompt estimates of E_π[r | x] from one pool and one on-policy sample, for every policy.

    Args:
        ref: log π_sft (P, N). policies: log π (n_pol, P, N). rewards: (P, N).
        u_pool: (P, m) uniforms of the pool (drawn from π_sft, shared by every policy, as stage 04's pool).
        u_policy: (P, k) uniforms of the on-policy samples (the same for every policy: common random numbers).
        cdfs: (:func:`_cdf` of ref, of policies), when the caller has them.
    Returns ``per_prompt`` (n_pol, P, 3) in :data:`ESTIMATORS` order — pool (SNIS), on-policy (mean of
    the k rewards), combined (SNIS corrected by the on-policy estimate of its error: module docstring) —
    and ``ess`` (n_pol, P).
    """
    P = ref.shape[0]
    rows = np.arange(P)[:, None]
    ref_cdf, pol_cdf = cdfs if cdfs is not None else (_cdf(ref), _cdf(policies))
    pool = _draw_cdf(ref_cdf, u_pool)  # (P, m)
    r_pool, ref_pool = rewards[rows, pool], ref[rows, pool]  # (P, m)
    in_pool = np.zeros(ref.shape, dtype=bool)
    in_pool[rows, pool] = True  # U_x: the pool's distinct candidates
    out = np.empty((len(policies), P, len(ESTIMATORS)))
    ess = np.empty((len(policies), P))
    for i, lp in enumerate(policies):
        c, ess[i] = snis(lp[rows, pool], ref_pool, r_pool)  # the workbench's SNIS, (P,) each
        y = _draw_cdf(pol_cdf[i], u_policy)  # (P, k) y ~ π
        r_y = rewards[rows, y]
        known = (np.exp(lp) * (rewards - c[:, None]) * in_pool).sum(1)  # Σ_{y∈U} π(y)(r(y) − c), exact
        out[i, :, 0], out[i, :, 1] = c, r_y.mean(1)
        out[i, :, 2] = c + known + ((r_y - c[:, None]) * ~in_pool[rows, y]).mean(1)
    return {"per_prompt": out, "ess": ess}


def simulate(ref: np.ndarray, policies: dict[str, np.ndarray], rewards: np.ndarray, *, m: int = 6, k: int = 2,
             prompts: int | None = None, replicates: int = 400, seed: int = 0, bootstrap: int = 1000,
             bootstrap_seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """R independent replicates of stage 04's estimates, each with its 95% CI exactly as the workbench
    computes it: the mean over prompts and a percentile bootstrap over prompts with ``bootstrap``
    resamples and ``numpy.random.default_rng(bootstrap_seed)`` (the run's seed: the same in every
    replicate, as in every run; :func:`vcb_lib.metrics.bootstrap_mean_ci`'s resamples, every
    estimator and policy resampled with the same prompts, as stage 04 does with one seed).

    Args: ``ref`` log π_sft (P0, N) over a population of P0 prompts; ``policies`` name -> log π (P0, N);
    ``rewards`` (P0, N); m pool candidates and k on-policy samples per prompt; ``prompts``: each
    replicate draws this many prompts uniformly with replacement from the population (what a CI over
    prompts is a CI for: the population mean), None = the P0 prompts themselves in every replicate
    (then the truth is their mean and the CI, which counts the prompts' spread, is conservative);
    ``seed`` seeds the draws.
    Returns ``names``, ``estimate``/``lo``/``hi`` (R, n_pol, 3), ``ess`` (R, n_pol, P), ``truth``
    (n_pol,) exact E_x E_π[r | x] over the population, ``kl`` (n_pol,) exact mean KL(π‖π_sft), and the
    settings.
    """
    if m < 1 or k < 1 or replicates < 1:
        raise ValueError(f"m, k and replicates must be >= 1, got m = {m}, k = {k}, replicates = {replicates}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    names = list(policies)
    lps = np.stack([np.asarray(policies[n], dtype=np.float64) for n in names])  # (n_pol, P0, N)
    ref, rewards = np.asarray(ref, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    if not lps.shape[1:] == ref.shape == rewards.shape:
        raise ValueError(f"shapes differ: policies {lps.shape[1:]}, ref {ref.shape}, rewards {rewards.shape}")
    for name, lp in (("ref", ref), *((f"policies[{n!r}]", lp) for n, lp in zip(names, lps))):
        mass = np.exp(lp).sum(1)
        if not np.allclose(mass, 1.0, atol=1e-6):
            raise ValueError(f"{name}: each prompt's probabilities must sum to 1 over the N responses "
                             f"(got {mass.min():.6f}..{mass.max():.6f})")
    P0 = ref.shape[0]
    P = P0 if prompts is None else int(prompts)
    if P < 2:
        raise ValueError("a CI over prompts needs >= 2 prompts")
    rng = np.random.default_rng(seed)
    ref_cdf, pol_cdf = _cdf(ref), _cdf(lps)
    shape = (replicates, len(names), len(ESTIMATORS))
    est, lo, hi = np.empty(shape), np.empty(shape), np.empty(shape)
    ess = np.empty((replicates, len(names), P))
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    for t in range(replicates):
        rows = np.arange(P0) if prompts is None else rng.integers(0, P0, size=P)  # (P,)
        rep = replicate(ref[rows], lps[:, rows], rewards[rows], rng.random((P, m)), rng.random((P, k)),
                        cdfs=(ref_cdf[rows], pol_cdf[:, rows]))
        values = rep["per_prompt"].transpose(1, 0, 2).reshape(P, -1)  # (P, n_pol·3)
        est[t] = values.mean(0).reshape(shape[1:])
        if bootstrap > 0:
            bounds = np.quantile(_bootstrap_means(values, bootstrap, bootstrap_seed), q, axis=0)  # (2, n_pol·3)
            lo[t], hi[t] = bounds[0].reshape(shape[1:]), bounds[1].reshape(shape[1:])
        else:
            lo[t] = hi[t] = np.nan
        ess[t] = rep["ess"]
    p = np.exp(lps)
    truth = (p * rewards).sum(2).mean(1)  # (n_pol,)
    kl = np.where(p > 0, p * (lps - ref), 0.0).sum(2).mean(1)
    return {"names": names, "estimate": est, "lo": lo, "hi": hi, "ess": ess, "truth": truth, "kl": kl,
            "m": m, "k": k, "prompts": P, "resampled_prompts": prompts is not None, "replicates": replicates,
            "seed": seed, "bootstrap": bootstrap, "ci": ci}


# --------------------------------------------------------------------------------------------
# Calibration over replicates
# --------------------------------------------------------------------------------------------


def calibrate(sim: dict[str, Any], *, fraction: float = POOL_ESS_MIN_FRACTION) -> dict[str, dict[str, Any]]:
    """Per policy, from :func:`simulate`'s replicates: exact ``kl`` and ``truth``; the pool's ESS as a
    fraction of m (``ess_mean``: mean over replicates of the mean per-prompt ESS/m, ``ess_p10``: 10th
    percentile of the per-prompt ESS/m over prompts and replicates); ``valid_share``: replicates where
    :func:`pool_valid` (at ``fraction``) accepts the pool; and per estimator ``bias`` (mean estimate −
    truth) with its Monte-Carlo SE ``bias_se``, ``rmse``, ``coverage`` (share of CIs holding the truth)
    with its binomial SE ``coverage_se``, ``half_width`` (mean of (hi − lo)/2); for the pool also
    ``coverage_valid`` (coverage among the replicates pool_valid accepts; None when it accepts none)."""
    m, R = sim["m"], sim["replicates"]
    out = {}
    for i, name in enumerate(sim["names"]):
        truth = float(sim["truth"][i])
        frac = sim["ess"][:, i] / m  # (R, P)
        valid = frac.mean(1) >= fraction * (1 - 1e-12)  # (R,) pool_valid per replicate
        row: dict[str, Any] = {"kl": float(sim["kl"][i]), "truth": truth, "ess_mean": float(frac.mean()),
                               "ess_p10": float(np.quantile(frac, 0.1)), "valid_share": float(valid.mean())}
        for j, est in enumerate(ESTIMATORS):
            e, lo, hi = sim["estimate"][:, i, j], sim["lo"][:, i, j], sim["hi"][:, i, j]
            covered = (lo <= truth) & (truth <= hi)
            cov = float(covered.mean())
            row[est] = {"bias": float(e.mean() - truth), "bias_se": float(e.std(ddof=1) / math.sqrt(R)) if R > 1 else math.nan,
                        "rmse": float(np.sqrt(((e - truth) ** 2).mean())), "coverage": cov,
                        "coverage_se": math.sqrt(max(cov * (1 - cov), 1.0 / R) / R),
                        "half_width": float(((hi - lo) / 2).mean())}
            if est == "pool":
                row[est]["coverage_valid"] = float(covered[valid].mean()) if valid.any() else None
        out[name] = row
    return out


def derive_threshold(sims: Sequence[dict[str, Any]], *, target: float = POOL_COVERAGE_TARGET, step: float = 0.05,
                     min_accepted: int = 20) -> dict[str, Any]:
    """The smallest ESS fraction f (a multiple of ``step`` in (0, 1]) such that, in every simulation and
    for every policy, the pool's CI covers the truth in >= ``target`` of the replicates whose mean
    per-prompt ESS is >= f·m (a policy with fewer than ``min_accepted`` accepted replicates is not
    judged: too few to measure a coverage). Returns ``fraction`` and, per candidate f, the worst such
    coverage (``worst``: f -> (coverage, simulation index, policy) or None)."""
    worst: dict[float, Any] = {}
    chosen = None
    for f in np.round(np.arange(step, 1.0 + 1e-9, step), 10):
        low = None
        for s, sim in enumerate(sims):
            frac = sim["ess"].mean(2) / sim["m"]  # (R, n_pol)
            for i, name in enumerate(sim["names"]):
                acc = frac[:, i] >= f * (1 - 1e-12)
                if acc.sum() < min_accepted:
                    continue
                t = sim["truth"][i]
                cov = float(((sim["lo"][acc, i, 0] <= t) & (t <= sim["hi"][acc, i, 0])).mean())
                if low is None or cov < low[0]:
                    low = (cov, s, name)
        worst[float(f)] = low
        if chosen is None and (low is None or low[0] >= target):
            chosen = float(f)
    return {"fraction": chosen, "target": target, "worst": worst}


# --------------------------------------------------------------------------------------------
# The exact tier's case
# --------------------------------------------------------------------------------------------


GAMMAS = (20.0, 10.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02)  # π_opt's γ in the calibration: KL 0.001 to 2.6 nats


def exact_case(gammas: Sequence[float] = GAMMAS, *,
               splits: Sequence[str] = ("train", "test")) -> dict[str, Any]:
    """The exact tier's enumerated distributions, computable in a second without training.

    π_sft is the task's known target π_target (:func:`vcb_lib.tasks.exact.target_logps`: the
    distribution the SFT stage fits; stage 04 reports the fit as ``fit_kl_target``), over all
    |V|^L = 1296 responses of the in-distribution prompts of ``splits`` (train + test: 24 prompts).
    Policies: ``sft`` (π_sft itself) and ``gamma=<γ>`` = π_opt of Eq. 15, π_sft·e^{r/(γσ_r(x))}/Z with
    σ_r(x) the exact reward std under π_sft (as stage 04's exact part builds it).
    Returns ``ref`` (P, N), ``rewards`` (P, N), ``policies`` {name: (P, N)}, ``prompts``.
    """
    from vcb_lib import exact
    from vcb_lib.data import task_prompts
    from vcb_lib.tasks.exact import all_responses, reward_ids, space, target_logps, token_ids

    responses = all_responses(len(space().vocabulary), space().length)
    prompts = [r["prompt"] for s in splits for r in task_prompts("exact", s, 0)]
    ref = np.stack([target_logps(token_ids(p), responses) for p in prompts])  # (P, N)
    rewards = np.stack([reward_ids(token_ids(p), responses) for p in prompts])
    sigma = exact.reward_std(ref, rewards)
    policies = {"sft": ref} | {f"gamma={g:g}": exact.optimal_logps(ref, rewards, g * sigma) for g in gammas}
    return {"ref": ref, "rewards": rewards, "policies": policies, "prompts": prompts}


def table(cal: dict[str, dict[str, Any]]) -> str:
    """Markdown coverage-vs-KL table of :func:`calibrate`'s result, policies in order of KL."""
    head = ("| policy | KL | ESS/m mean | ESS/m p10 | pool bias | pool cover | pool ½w | pool_valid | on-pol bias | "
            "on-pol cover | on-pol ½w | comb bias | comb cover | comb ½w |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in sorted(cal.items(), key=lambda kv: kv[1]["kl"]):
        p, o, s = r["pool"], r["on_policy"], r["combined"]
        lines.append(f"| {name} | {r['kl']:.3f} | {r['ess_mean']:.2f} | {r['ess_p10']:.2f} | {p['bias']:+.3f} | "
                     f"{p['coverage']:.2f} | {p['half_width']:.3f} | {r['valid_share']:.2f} | {o['bias']:+.3f} | "
                     f"{o['coverage']:.2f} | {o['half_width']:.3f} | {s['bias']:+.3f} | {s['coverage']:.2f} | {s['half_width']:.3f} |")
    return "\n".join(lines)
