"""Evaluation metrics (vcb_lib.metrics): hand-computed examples and independent cross-checks."""
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import BLEU

from vcb_lib import metrics, theory

# --------------------------------------------------------------------------------------------
# Win rate (Table 2)
# --------------------------------------------------------------------------------------------


def test_identical_policy_ties_everything_and_has_win_rate_one_half():
    r = np.random.default_rng(0).normal(size=(50, 4))
    out = metrics.win_rate(r, r.copy())
    assert (out["win"], out["tie"], out["lose"]) == (0.0, 1.0, 0.0)
    assert out["win_rate"] == 0.5 and out["win_minus_lose"] == 0.0
    assert out["win_rate_ci"] == [0.5, 0.5] and out["win_minus_lose_ci"] == [0.0, 0.0]
    assert out["n_prompts"] == 50 and out["n_pairs"] == 200


def test_same_distribution_ci_contains_half_and_shifted_one_excludes_it():
    # a policy equal to π_sft, sampled independently: rewards of both come from the same distribution
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=400), rng.normal(size=400)
    out = metrics.win_rate(a, b, seed=3)
    lo, hi = out["win_rate_ci"]
    assert lo < 0.5 < hi
    assert lo <= out["win_rate"] <= hi
    lo2, hi2 = out["win_minus_lose_ci"]
    assert lo2 <= out["win_minus_lose"] <= hi2
    # a clearly better policy: CI above 1/2
    better = metrics.win_rate(a + 1.0, b, seed=3)
    assert better["win_rate_ci"][0] > 0.6


def test_always_higher_wins_with_degenerate_ci():
    b = np.random.default_rng(2).normal(size=(30, 3))
    out = metrics.win_rate(b + 1e-3, b)
    assert out["win_rate"] == 1.0 and out["win"] == 1.0 and out["win_minus_lose"] == 1.0
    assert out["win_rate_ci"] == [1.0, 1.0]
    assert metrics.win_rate(b, b + 1e-3)["win_rate"] == 0.0


def test_win_rate_hand_example_index_and_all_pairings():
    a = np.array([[3.0, 1.0], [2.0, 2.0]])
    b = np.array([[1.0, 2.0], [2.0, 0.0]])
    # index pairs: (3>1 win) (1<2 lose) (2=2 tie) (2>0 win) -> win 2/4, tie 1/4, lose 1/4
    out = metrics.win_rate(a, b, bootstrap=0)
    assert (out["win"], out["tie"], out["lose"]) == (0.5, 0.25, 0.25)
    assert out["win_rate"] == pytest.approx(0.625) and out["win_minus_lose"] == pytest.approx(0.25)
    assert out["win_rate_ci"] is None
    # all pairs: prompt 0: 3>1 W, 3>2 W, 1=1 T, 1<2 L; prompt 1: 2=2 T, 2>0 W, 2=2 T, 2>0 W
    # -> wins 2+2 = 4, ties 1+2 = 3, losses 1 -> 4/8, 3/8, 1/8
    out = metrics.win_rate(a, b, bootstrap=0, pairing="all")
    assert (out["win"], out["tie"], out["lose"]) == (0.5, 0.375, 0.125)
    assert out["n_pairs"] == 8
    # tie tolerance: |3-1|,|1-2|,|2-2|,|2-0| with tol 1 -> only 2 and 2 exceed -> wins 2/4, ties 2/4
    out = metrics.win_rate(a, b, bootstrap=0, tie_tol=1.0)
    assert (out["win"], out["tie"], out["lose"]) == (0.5, 0.5, 0.0)


def test_bootstrap_reproducible_with_seed():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(60, 2)), rng.normal(size=(60, 2))
    x, y, z = metrics.win_rate(a, b, seed=7), metrics.win_rate(a, b, seed=7), metrics.win_rate(a, b, seed=8)
    assert x["win_rate_ci"] == y["win_rate_ci"] and x["win_minus_lose_ci"] == y["win_minus_lose_ci"]
    assert x["win_rate_ci"] != z["win_rate_ci"]
    assert x["win_rate"] == z["win_rate"]  # the point estimate does not depend on the seed
    assert metrics.bootstrap_mean_ci(np.arange(10.0), seed=1) == metrics.bootstrap_mean_ci(np.arange(10.0), seed=1)


def test_bootstrap_matches_a_plain_loop():
    """Independent implementation of the percentile bootstrap over prompts."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=25), rng.normal(size=25)
    per_prompt = (a > b) + 0.5 * (a == b)
    gen = np.random.default_rng(11)
    boots = [per_prompt[gen.integers(0, 25, size=25)].mean() for _ in range(200)]
    want = np.quantile(boots, [0.05, 0.95])
    got = metrics.win_rate(a, b, bootstrap=200, seed=11, ci=0.9)["win_rate_ci"]
    np.testing.assert_allclose(got, want)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=20))
def test_win_rate_is_antisymmetric(pairs):
    a, b = np.array(pairs, dtype=float).T
    ab, ba = metrics.win_rate(a, b, bootstrap=0), metrics.win_rate(b, a, bootstrap=0)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    assert ab["win"] == ba["lose"] and ab["tie"] == pytest.approx(ba["tie"])
    assert ab["win"] + ab["tie"] + ab["lose"] == pytest.approx(1.0)


@pytest.mark.parametrize("a, b, match", [
    (np.zeros(3), np.zeros(4), "shape"),
    (np.zeros((3, 2)), np.zeros((3, 3)), "shape"),
    (np.zeros(0), np.zeros(0), "empty"),
    (np.array([1.0, np.nan]), np.zeros(2), "NaN"),
    (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), "1-D or 2-D"),
])
def test_win_rate_rejects_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        metrics.win_rate(a, b)


def test_win_rate_accepts_torch_and_all_pairing_with_different_k():
    out = metrics.win_rate(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0]]), pairing="all", bootstrap=0)
    assert (out["win"], out["tie"], out["lose"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


# --------------------------------------------------------------------------------------------
# KL and reward vs KL (Figure 5)
# --------------------------------------------------------------------------------------------


def test_identical_policy_has_zero_kl():
    lp = np.random.default_rng(0).normal(-20, 5, size=(40, 4))
    out = metrics.kl_estimate(lp, lp.copy())
    assert out == {"kl": 0.0, "kl_se": 0.0, "kl_k3": 0.0, "n_prompts": 40, "n_samples": 160}


def test_kl_monte_carlo_matches_exact_categorical_kl():
    rng = np.random.default_rng(0)
    logits_pi, logits_sft = rng.normal(size=6) * 2, rng.normal(size=6)
    log_pi = logits_pi - np.logaddexp.reduce(logits_pi)
    log_sft = logits_sft - np.logaddexp.reduce(logits_sft)
    exact = float(np.sum(np.exp(log_pi) * (log_pi - log_sft)))
    y = rng.choice(6, size=(2000, 2), p=np.exp(log_pi))  # samples from π
    out = metrics.kl_estimate(log_pi[y], log_sft[y])
    assert abs(out["kl"] - exact) < 4 * out["kl_se"]
    assert out["kl_k3"] == pytest.approx(exact, abs=0.1)
    # the SE is over prompts: std of the per-prompt means / sqrt(N)
    per_prompt = (log_pi[y] - log_sft[y]).mean(1)
    assert out["kl_se"] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(2000))
    # sampling from π_sft instead would give -KL(π_sft‖π): the sign convention matters
    y_sft = rng.choice(6, size=4000, p=np.exp(log_sft))
    assert metrics.kl_estimate(log_pi[y_sft], log_sft[y_sft])["kl"] < 0


def test_reward_kl_point_hand_example():
    rewards = np.array([[1.0, 3.0], [2.0, 6.0]])  # per-prompt means 2, 4
    pol = np.array([[-1.0, -2.0], [-3.0, -4.0]])
    ref = np.array([[-2.0, -2.0], [-3.0, -6.0]])  # log-ratios [1, 0], [0, 2] -> per-prompt .5, 1
    out = metrics.reward_kl_point(rewards, pol, ref)
    assert out["mean_reward"] == 3.0 and out["reward_se"] == pytest.approx(np.std([2, 4], ddof=1) / math.sqrt(2))
    assert out["kl"] == 0.75 and out["kl_se"] == pytest.approx(np.std([0.5, 1.0], ddof=1) / math.sqrt(2))
    with pytest.raises(ValueError, match="shape"):
        metrics.reward_kl_point(rewards[:1], pol, ref)
    with pytest.raises(ValueError, match="shape"):
        metrics.kl_estimate(pol, ref[:, :1])


# --------------------------------------------------------------------------------------------
# Misalignment (A.5)
# --------------------------------------------------------------------------------------------


def test_misalignment_wrapper_agrees_with_theory():
    rng = np.random.default_rng(0)
    pol, ref, r = rng.normal(size=(10, 8)), rng.normal(size=(10, 8)), rng.normal(size=(10, 8))
    out = metrics.misalignment(pol, ref, r)
    pooled, per = theory.misalignment_rate(pol, ref, r, per_prompt=True)
    assert out["misalignment_rate"] == pytest.approx(pooled)
    assert out["per_prompt_mean"] == pytest.approx(float(np.mean(per)))
    assert out["n_prompts_with_pairs"] == 10
    # hand example, one prompt: rewards 1 < 2 < 3, log-ratios 0, 2, 1 -> pairs (1,2) ok, (1,3) ok, (2,3) misaligned
    hand = metrics.misalignment(np.array([[0.0, 2.0, 1.0]]), np.zeros((1, 3)), np.array([[1.0, 2.0, 3.0]]))
    assert hand["misalignment_rate"] == pytest.approx(1 / 3)
    # prompts with different pair counts (mask): prompt 0 as above, 1 of 3 pairs misaligned; prompt 1 keeps
    # 2 responses, rewards 1 < 2 with log-ratios 1 > 0 -> its 1 pair misaligned.
    # pooled (Table 6) = (1 + 1) / (3 + 1) = 0.5; mean of per-prompt rates = (1/3 + 1) / 2 = 2/3
    masked = metrics.misalignment(np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 9.0]]), np.zeros((2, 3)),
                             np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), mask=np.array([[1, 1, 1], [1, 1, 0]], bool))
    assert masked["misalignment_rate"] == pytest.approx(0.5) and masked["per_prompt_mean"] == pytest.approx(2 / 3)
    # perfectly calibrated policy: log-ratio = reward -> no misalignment
    assert metrics.misalignment(r, np.zeros_like(r), r)["misalignment_rate"] == 0.0


# --------------------------------------------------------------------------------------------
# Diversity (A.8)
# --------------------------------------------------------------------------------------------


def test_distinct_n_hand_example():
    texts = ["The cat sat.", "the cat ran"]
    # tokens: [the, cat, sat, .], [the, cat, ran]
    # unigrams: 7 total, distinct {the, cat, sat, ., ran} = 5 -> 5/7
    assert metrics.distinct_n(texts, 1) == pytest.approx(5 / 7)
    # bigrams (not across texts): (the cat) (cat sat) (sat .) | (the cat) (cat ran) -> 4 distinct / 5
    assert metrics.distinct_n(texts, 2) == pytest.approx(4 / 5)
    assert metrics.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # token ids used as is
    with pytest.raises(ValueError, match="no 3-gram"):
        metrics.distinct_n(["a b", "c"], 3)


def test_ead_hand_example():
    texts = ["the cat sat", "the cat ran"]
    # C = 6 unigrams, N = 4 distinct (the, cat, sat, ran), V = 10:
    # expected distinct = 10 * (1 - 0.9**6) = 10 * (1 - 0.531441) = 4.68559
    # EAD = 4 / 4.68559 = 0.853681...
    assert metrics.ead(texts, 1, vocab_size=10) == pytest.approx(0.8536811799581)
    # bigrams: (the cat) x2, (cat sat), (cat ran): C = 4, N = 3; 10 * (1 - 0.9**4) = 3.439 -> 0.872346...
    assert metrics.ead(texts, 2, vocab_size=10) == pytest.approx(3 / 3.439)
    # huge V: the denominator tends to C, so EAD -> distinct-n
    assert metrics.ead(texts, 1, vocab_size=10**12) == pytest.approx(metrics.distinct_n(texts, 1), rel=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        metrics.ead(texts, 1, vocab_size=1)


def test_self_bleu_identical_is_one_and_disjoint_is_zero():
    same = [["the cat sat on the mat"] * 4, ["a b c d"] * 3]
    assert metrics.self_bleu(same, 2) == pytest.approx(1.0)
    assert metrics.self_bleu(same, 3) == pytest.approx(1.0)
    disjoint = [["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]]
    assert metrics.self_bleu(disjoint, 2) == 0.0


def test_self_bleu_hand_value_and_sacrebleu_cross_check():
    group = ["the cat sat", "the cat ran"]
    # each sentence vs the other: unigram p1 = 2/3 (the, cat), bigram p2 = 1/2 (the cat), equal lengths -> BP 1
    # BLEU-2 = sqrt(2/3 * 1/2) = 1/sqrt(3) = 0.57735
    assert metrics.self_bleu([group], 2) == pytest.approx(1 / math.sqrt(3))
    # BLEU-3: no trigram match -> floor smoothing p3 = 0.1/1; (2/3 * 1/2 * 0.1) ** (1/3) = (1/30) ** (1/3)
    assert metrics.self_bleu([group], 3) == pytest.approx((1 / 30) ** (1 / 3))

    groups = [["the cat sat on the mat", "a cat sat on a mat", "the dog lay on the rug"],
              ["I like green tea", "I like black tea a lot"]]
    for n in (2, 3):
        bleu = BLEU(max_ngram_order=n, effective_order=True, smooth_method="floor", smooth_value=0.1)
        per_prompt = [np.mean([bleu.sentence_score(h, g[:i] + g[i + 1:]).score for i, h in enumerate(g)])
                      for g in groups]
        want = np.mean(per_prompt) / 100
        assert metrics.self_bleu(groups, n) == pytest.approx(want)
        assert 0.0 < want < 1.0
    # prompts weigh equally: the mean of the two one-prompt values
    assert metrics.self_bleu(groups, 2) == pytest.approx((metrics.self_bleu(groups[:1], 2) + metrics.self_bleu(groups[1:], 2)) / 2)


def test_self_bleu_rejects_bad_groups():
    with pytest.raises(ValueError, match=">= 2 samples"):
        metrics.self_bleu([["only one"]], 2)
    with pytest.raises(TypeError):
        metrics.self_bleu(["a b", "c d"], 2)


def test_diversity_row():
    groups = [["the cat sat", "the cat ran"], ["a b", "a b"]]
    row = metrics.diversity(groups, vocab_size=10)
    assert row["ead"] == pytest.approx((metrics.ead(groups[0], vocab_size=10) + metrics.ead(groups[1], vocab_size=10)) / 2)
    assert row["ead_pooled"] == pytest.approx(metrics.ead(groups[0] + groups[1], vocab_size=10))
    assert row["distinct_2"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert set(row) == {"ead", "ead_pooled", "distinct_1", "distinct_2", "self_bleu_2", "self_bleu_3"}


# --------------------------------------------------------------------------------------------
# Length (A.7)
# --------------------------------------------------------------------------------------------


def test_length_stats():
    out = metrics.length_stats(np.array([[1, 2, 3], [4, 100, 3]]))
    # sorted 1 2 3 3 4 100: mean 113/6, median 3, q1 at position 1.25 -> 2.25, q3 at 3.75 -> 3.75
    assert out["n"] == 6 and out["mean"] == pytest.approx(113 / 6)
    assert (out["q1"], out["median"], out["q3"], out["min"], out["max"]) == (2.25, 3.0, 3.75, 1.0, 100.0)
    with pytest.raises(ValueError):
        metrics.length_stats([])
    with pytest.raises(ValueError):
        metrics.length_stats([-1, 2])


# --------------------------------------------------------------------------------------------
# The shared pool: importance sampling, paired differences, calibration slope
# --------------------------------------------------------------------------------------------


def _tabular_pool(P=400, m=16, seed=0):
    """Every prompt has the same 6 responses: π_sft = p, π = q (tilted towards reward), rewards r.
    Draw m candidates per prompt from p; return the pool and the exact E_q[r]."""
    rng = np.random.default_rng(seed)
    r = np.array([0.0, 0.2, 0.5, 0.9, 1.0, 0.3])
    p = np.array([0.3, 0.25, 0.2, 0.1, 0.05, 0.1])
    q = p * np.exp(1.5 * r)
    q /= q.sum()
    idx = rng.choice(6, size=(P, m), p=p)
    return np.log(q)[idx], np.log(p)[idx], r[idx], float((q * r).sum())


def test_snis_recovers_the_exact_expectation_of_a_tabular_policy():
    from vcb_lib.metrics import pool_estimate

    policy, ref, rewards, exact = _tabular_pool()
    est = pool_estimate(policy, ref, rewards, bootstrap=1000, seed=1)
    lo, hi = est["ci"]
    assert lo <= exact <= hi and hi - lo < 0.05, (est["mean"], exact, est["ci"])
    assert abs(est["mean"] - exact) < 0.02
    # π = π_sft: weights all 1, the plain mean, ESS = m
    same = pool_estimate(ref, ref, rewards, bootstrap=0)
    assert same["mean"] == pytest.approx(rewards.mean()) and same["ess_mean"] == pytest.approx(16) and not same["ess_flag"]


def test_a_policy_far_from_sft_is_flagged_by_its_ess():
    from vcb_lib.metrics import ESS_MIN_FRACTION, pool_estimate

    rng = np.random.default_rng(0)
    rewards, ref = rng.normal(size=(50, 16)), rng.normal(-30, 2, size=(50, 16))
    far = pool_estimate(ref + 20.0 * rewards, ref, rewards, bootstrap=0)  # a few candidates carry all the weight
    assert far["ess_mean"] < ESS_MIN_FRACTION * 16 and far["ess_flag"]
    near = pool_estimate(ref + 0.02 * rewards, ref, rewards, bootstrap=0)
    assert not near["ess_flag"] and near["ess_mean"] >= ESS_MIN_FRACTION * 16
    middle = pool_estimate(ref + 0.3 * rewards, ref, rewards, bootstrap=0)  # the flag fires at m = 16 well before ESS = 1
    assert middle["ess_flag"] and middle["ess_mean"] > 0.5 * 16


@pytest.mark.parametrize("planted", [1.0, 0.3, -0.5])
def test_calibration_slope_recovers_a_planted_slope(planted):
    from vcb_lib.metrics import calibration

    rng = np.random.default_rng(3)
    rewards = rng.normal(size=(80, 8)) * rng.uniform(0.5, 2.0, size=(80, 1)) + rng.normal(size=(80, 1))
    ref = rng.normal(-20, 3, size=(80, 8))
    gamma = 0.05
    sigma = rewards.std(axis=1, keepdims=True)
    # Eq. 16 with a planted slope: γ log π/π_sft = s · r/σ_r − γ log Z(x), plus noise
    policy = ref + (planted * rewards / sigma + rng.normal(scale=0.05, size=(80, 8))) / gamma + rng.normal(size=(80, 1))
    out = calibration(policy, ref, rewards, gamma, bootstrap=500, seed=0)
    lo, hi = out["slope_ci"]
    assert lo <= planted <= hi and hi - lo < 0.05 and out["slope"] == pytest.approx(planted, abs=0.02)
    assert out["r2"] > 0.9 and abs(out["spearman"]) > 0.9 and out["prompts_used"] == 80 and out["pairs"] == 80 * 28


def test_bootstrap_intervals_cover_the_truth_at_about_their_nominal_rate():
    """200 simulated datasets of 60 prompts: the 95% percentile intervals of a mean and of a paired
    difference cover the true value in 88-99% of them (the percentile bootstrap undercovers a little
    at small N; 200 draws put the binomial SE at 1.5 points)."""
    from vcb_lib.metrics import bootstrap_mean_ci, paired_difference

    rng = np.random.default_rng(0)
    cover_mean = cover_diff = 0
    for rep in range(200):
        prompt = rng.normal(size=60)  # shared prompt effect: cancels in the paired difference
        a = 0.3 + prompt + rng.exponential(size=60)  # skewed noise; E[a] = 1.3
        b = prompt + rng.normal(size=60)  # E[a - b] = 1.3
        lo, hi = bootstrap_mean_ci(a, bootstrap=400, seed=rep)
        cover_mean += lo <= 1.3 <= hi
        d = paired_difference(a, b, bootstrap=400, seed=rep)
        cover_diff += d["ci"][0] <= 1.3 <= d["ci"][1]
    assert 0.88 <= cover_mean / 200 <= 0.99 and 0.88 <= cover_diff / 200 <= 0.99, (cover_mean, cover_diff)


def test_paired_difference_resolves_only_when_the_interval_excludes_zero():
    from vcb_lib.metrics import paired_difference

    rng = np.random.default_rng(1)
    base = rng.normal(size=200)
    clear = paired_difference(base + 0.5, base + rng.normal(scale=0.1, size=200), bootstrap=500)
    assert clear["resolved"] and clear["ci"][0] > 0 and clear["mde"] < 0.1
    e = rng.normal(size=100)
    null = paired_difference(base + np.concatenate([e, -e]), base, bootstrap=500, seed=2)  # mean difference exactly 0
    assert null["ci"][0] < 0 < null["ci"][1] and not null["resolved"]


def test_degenerate_and_bad_pools_never_give_nan():
    import json

    from vcb_lib.metrics import calibration, pool_estimate

    ref = np.zeros((4, 3))
    constant = calibration(ref + 1.0, ref, np.ones((4, 3)), 0.1, bootstrap=50)
    assert constant["slope"] is None and "nothing to calibrate" in constant["degenerate"]
    json.dumps(constant, allow_nan=False)
    same = calibration(ref, ref, np.arange(12.0).reshape(4, 3), 0.1, bootstrap=50)  # π = π_sft: y = 0
    assert same["slope"] == 0.0 and same["r2"] is None and same["spearman"] is None
    json.dumps(same, allow_nan=False)
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="rewards has 1 NaN/inf"):
        pool_estimate(ref, ref, bad)
    with pytest.raises(ValueError, match="rewards has 1 NaN/inf"):
        calibration(ref, ref, bad, 0.1)


def test_seed_interval_is_the_t_interval_of_the_mean():
    from vcb_lib.metrics import seed_interval

    out = seed_interval([0.1, 0.3, 0.2])  # mean 0.2, SD 0.1, t(0.975, 2) = 4.303
    assert out["mean"] == pytest.approx(0.2) and out["sd_seeds"] == pytest.approx(0.1)
    assert out["ci_seeds"] == pytest.approx([0.2 - 4.303 * 0.1 / 3 ** 0.5, 0.2 + 4.303 * 0.1 / 3 ** 0.5])
    assert not out["resolved_seeds"] and seed_interval([1.0, 1.1, 0.9, 1.0])["resolved_seeds"]
    assert seed_interval([0.5]) == {"mean": 0.5, "sd_seeds": None, "ci_seeds": None, "resolved_seeds": False}


def _tilted_pool(P, m, rng, betas):
    """Prompts share 6 responses and π_sft = p; policy a tilts p by exp(β_x r) with β_x per prompt
    (so the a − π_sft difference varies across prompts), policy b is π_sft."""
    r = np.array([0.0, 0.2, 0.5, 0.9, 1.0, 0.3])
    p = np.array([0.3, 0.25, 0.2, 0.1, 0.05, 0.1])
    q = p[None] * np.exp(betas[:P, None] * r[None])
    q /= q.sum(1, keepdims=True)
    idx = rng.choice(6, size=(P, m), p=p)
    return np.log(q[np.arange(P)[:, None], idx]), np.log(p)[idx], r[idx]


def test_power_curve_predicts_the_half_width_of_a_larger_pool():
    """The half-width predicted for 2m candidates from an m-candidate pool matches the one measured
    on freshly drawn 2m-candidate pools; more prompts scale it exactly by 1/√(ratio)."""
    from vcb_lib.metrics import power_curve, snis

    rng = np.random.default_rng(0)
    P, m = 300, 4
    betas = rng.uniform(0.0, 3.0, P)
    a, ref, r = _tilted_pool(P, m, rng, betas)
    out = power_curve(a, ref, ref, r, prompts=(P, 4 * P), candidates=(m, 2 * m), repeats=100)
    hw = {(g["prompts"], g["candidates"]): g for g in out["grid"]}
    assert hw[P, m]["measured"] and not hw[P, 2 * m]["measured"] and not hw[4 * P, m]["measured"]
    assert hw[4 * P, m]["half_width"] == pytest.approx(hw[P, m]["half_width"] / 2)
    assert out["fit"]["s2_candidates"] > 0 and out["fit"]["s2_prompts"] > 0

    variances = []
    for _ in range(200):  # the truth at 2m: fresh pools, same prompts
        a2, ref2, r2 = _tilted_pool(P, 2 * m, rng, betas)
        variances.append((snis(a2, ref2, r2)[0] - snis(ref2, ref2, r2)[0]).var(ddof=1))
    truth = 1.96 * np.sqrt(np.mean(variances) / P)
    assert hw[P, 2 * m]["half_width"] == pytest.approx(truth, rel=0.15), (hw[P, 2 * m], truth)
    assert hw[P, 2 * m]["half_width"] < hw[P, m]["half_width"]


def test_power_curve_refuses_a_pool_too_small_to_fit():
    from vcb_lib.metrics import power_curve

    x = np.zeros((5, 1))
    with pytest.raises(ValueError, match=r">= 2 candidates per prompt, got 5 x 1"):
        power_curve(x, x, x, x)


# --------------------------------------------------------------------------------------------
# Family-wise error: Holm's step-down method over the resolution table's comparisons
# --------------------------------------------------------------------------------------------


def test_holm_matches_a_hand_computation():
    """p = (0.01, 0.04, 0.03, 0.005), α = 0.05, m = 4. Sorted: 0.005 ≤ 0.05/4 = 0.0125 rejects, 0.01 ≤ 0.05/3
    rejects, 0.03 > 0.05/2 stops: 0.03 and 0.04 stay unresolved, though each alone is below 0.05.
    Adjusted: 4·0.005 = 0.02, max(0.02, 3·0.01) = 0.03, max(0.03, 2·0.03) = 0.06, max(0.06, 1·0.04) = 0.06."""
    out = metrics.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}, alpha=0.05)
    assert {k: v["resolved"] for k, v in out.items()} == {"a": True, "b": False, "c": False, "d": True}
    assert {k: v["p_holm"] for k, v in out.items()} == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert {k: v["level"] for k, v in out.items()} == pytest.approx({"d": 1 - 0.05 / 4, "a": 1 - 0.05 / 3,
                                                                     "c": 1 - 0.05 / 2, "b": 1 - 0.05})
    assert all(v["resolved"] == (v["p_holm"] <= 0.05) for v in out.values())
    # a step that fails stops the procedure: b (0.04 ≤ 0.05 at its own step) is not resolved after c failed
    assert metrics.holm({"x": 0.001}, alpha=0.05)["x"]["resolved"] and metrics.holm({}, alpha=0.05) == {}
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        metrics.holm({"x": 1.5})


def test_family_wise_verdicts_on_a_planted_family_match_holm_by_hand():
    """Seven paired comparisons over 400 prompts with planted z = mean/SE (the per-prompt differences are
    standardised exactly): z 6, 3.2, 2.75, 2.2, 1.8, 1 and 0 (normal p ≈ 0, 0.0014, 0.006, 0.028, 0.072,
    0.32, 1). By hand: Holm's thresholds 0.05/7 = 0.0071, 0.05/6 = 0.0083, 0.05/5 = 0.01, 0.05/4 = 0.0125:
    the first three pass, z = 2.2 at its step needs ≤ 0.0125 and stops the procedure. Four comparisons
    resolve alone (p ≤ 0.05), three after Holm. Each p is a percentile-bootstrap one with ≥ 50 resamples
    beyond 0.05/7 (14,000), within ±0.004 of the normal value (±0.03 for the large ones)."""
    from statistics import NormalDist

    rng = np.random.default_rng(5)
    P, planted = 400, {"z6": 6.0, "z3.2": 3.2, "z2.75": 2.75, "z2.2": 2.2, "z1.8": 1.8, "z1": 1.0, "z0": 0.0}
    diffs = {}
    for name, z in planted.items():
        e = rng.normal(size=P)
        e = (e - e.mean()) / e.std(ddof=1)  # mean 0, SD 1 exactly: SE = 1/sqrt(P)
        diffs[name] = e + z / math.sqrt(P)
    out = metrics.family_wise(diffs, alpha=0.05, bootstrap=1000, seed=0)
    assert {v["bootstrap"] for v in out.values()} == {14000}
    for name, z in planted.items():
        assert out[name]["p"] == pytest.approx(2 * NormalDist().cdf(-z), abs=0.004 if z >= 2 else 0.03)
    assert {k for k, v in out.items() if v["resolved_alone"]} == {"z6", "z3.2", "z2.75", "z2.2"}
    assert {k for k, v in out.items() if v["resolved"]} == {"z6", "z3.2", "z2.75"}
    by_hand = metrics.holm({k: v["p"] for k, v in out.items()})
    assert {k: v["resolved"] for k, v in out.items()} == {k: v["resolved"] for k, v in by_hand.items()}


def test_resamples_for_level_keep_fifty_beyond_each_bound():
    assert metrics.resamples_for_level(0.95, 1000) == 2000  # 1000 would leave 25 per tail
    assert metrics.resamples_for_level(1 - 0.05 / 7, 1000) == 14000  # 1000 would leave about 4
    assert metrics.resamples_for_level(0.5, 1000) == 1000  # already enough: never fewer than asked
    for level in (0.9, 0.99, 1 - 0.05 / 3, 1 - 0.05 / 12):
        assert metrics.resamples_for_level(level) * (1 - level) / 2 >= 50 - 1e-9


def test_bootstrap_p_value_inverts_the_percentile_interval():
    rng = np.random.default_rng(3)
    for shift in (0.0, 0.05, 0.1, 0.2):
        d = rng.normal(size=300) + shift
        p = metrics.bootstrap_p_value(d, bootstrap=4000, seed=1)
        for level in (0.9, 0.95, 0.99):
            lo, hi = metrics.bootstrap_mean_ci(d, bootstrap=4000, seed=1, ci=level)
            if abs(p - (1 - level)) > 0.002:  # away from the boundary, where the quantiles' interpolation decides
                assert (lo > 0 or hi < 0) == (p < 1 - level)
    assert metrics.bootstrap_p_value(np.full(10, 2.0)) == 0.0 and metrics.bootstrap_p_value(np.zeros(10)) == 1.0


def test_the_report_resolution_table_is_holm_adjusted(monkeypatch):
    """stages.analysis.pool_family reads each policy's per-prompt pool estimates, takes the reference's
    differences with each, and resolves them together (Holm); the report's resolution table shows p, the
    Holm-adjusted p and the family-wise verdict, and says a comparison resolved alone but not after Holm."""
    import pandas as pd

    from vcb_lib import report
    from vcb_lib.config import load_params
    from vcb_lib.stages import analysis, evaluate

    rng = np.random.default_rng(0)
    P, ids = 400, [f"p{i}" for i in range(400)]
    base = rng.normal(size=P)
    # vcb − other, standardised to SE 1/sqrt(P) with planted z: sft 6 (resolved), dpo 2.2 (p ≈ 0.028: alone
    # only, > 0.05/2), ipo 0.5 (not resolved)
    per_prompt = {"vcb": base}
    for name, z in (("sft", 6.0), ("dpo", 2.2), ("ipo", 0.5)):
        e = rng.normal(size=P)
        per_prompt[name] = base - ((e - e.mean()) / e.std(ddof=1) + z / math.sqrt(P))
    monkeypatch.setattr(evaluate, "pool_per_prompt", lambda cfg, policy: pd.Series(per_prompt[policy], index=ids))
    cfg = load_params(None, {"evaluation.bootstrap": 1000})

    def entry(name):
        d = per_prompt["vcb"] - per_prompt[name]
        lo, hi = metrics.bootstrap_mean_ci(d, bootstrap=1000)
        return {"gold_diff": float(d.mean()), "ci": [lo, hi], "resolved": bool(lo > 0 or hi < 0), "mde": 0.1}

    method = {"gold": 0.5, "gold_ci": [0.4, 0.6], "rm": 0.1, "ess_mean": 30.0, "ess_flag": False, "slope": None,
              "slope_ci": None, "r2": None, "spearman": None, "misalignment_rate": 0.3}
    pool = {"reference": "vcb", "gold_name": "gold reward", "prompts": P, "candidates_per_prompt": 4, "mde_factor": 2.8,
            "ess_threshold": 0.4, "paired": {f"vcb-vs-{n}": entry(n) for n in ("sft", "dpo", "ipo")},
            "methods": {n: method for n in ("sft", "vcb", "dpo", "ipo")}}
    family = analysis.pool_family(cfg, {"pool": pool})
    comps = family["comparisons"]
    assert family["method"] == "holm" and family["alpha"] == 0.05 and set(comps) == set(pool["paired"])
    assert comps["vcb-vs-dpo"]["diff"] == pytest.approx(pool["paired"]["vcb-vs-dpo"]["gold_diff"])
    assert comps["vcb-vs-dpo"]["bootstrap"] == 6000  # 50 beyond 0.05/3 in each tail
    # by hand: p ≈ (0, 0.028, 0.62); thresholds 0.05/3, 0.05/2, 0.05: sft passes, dpo (0.028 > 0.025) stops
    assert [comps[f"vcb-vs-{n}"]["resolved"] for n in ("sft", "dpo", "ipo")] == [True, False, False]
    assert pool["paired"]["vcb-vs-dpo"]["resolved"]  # its own 95% CI excludes 0
    text = "\n".join(report.pool_sections({"pool": pool | {"family": family}}))
    assert "Holm's step-down method" in text and "family-wise error over the table's 3 comparisons at 0.05" in text
    assert "| 95% CI | p | Holm p | resolved | mde |" in text
    assert re.search(r"\| vcb vs sft \| [0-9.]+ \| \[[^]]+\] \| < 0\.0003 \| < 0\.0003 \| yes \|", text)
    assert re.search(r"\| vcb vs dpo \| .* \| alone only, not after Holm \|", text)
    assert re.search(r"\| vcb vs ipo \| .* \| not resolved \|", text)
    plain = "\n".join(report.pool_sections({"pool": pool}))  # no family: says the verdicts are per comparison
    assert "per comparison: no correction for the 3 comparisons" in plain
