"""The exact tier (issue #18): the enumerable task, its model and tokenizer, the exact metrics against
Monte-Carlo estimates and against independent implementations, Theorem 1's π_opt, VCB reaching
Eq. 12 on its candidates with the real Trainer, the cap on |V|^L, and stage 04's ``exact`` key."""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from vcb_lib import exact, theory
from vcb_lib.config import ConfigError, TrainingConfig, load_params
from vcb_lib.data import build_candidates, candidate_groups, load_prompts
from vcb_lib.logps import sequence_logps
from vcb_lib.metrics import win_rate as sampled_win_rate
from vcb_lib.models import load_policy, load_tokenizer
from vcb_lib.rewards import gold_reward
from vcb_lib.samplers import HFSampler
from vcb_lib.tasks import exact as task

SPEC = "random:exact"
V, L = 6, 4
RESPONSES = task.all_responses(V, L)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SPEC)


@pytest.fixture(scope="module")
def sft():
    return load_policy(SPEC)


def perturbed(model, seed: int, scale: float = 0.15):
    """A second policy: ``model`` with seeded Gaussian noise on every weight."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other.eval()


def rewards_of(prompts):
    return np.stack([task.reward_ids(task.token_ids(p), RESPONSES) for p in prompts])


# ---- the task ---------------------------------------------------------------------------------


def test_reward_has_the_documented_structure():
    gold = gold_reward("exact")
    r = gold.score(["a c b"] * 5, ["a c b e", "a c b f", "a c b a", "a a b e", "d d d d"])
    # copy 1.0 + 0.6 + 0.3, ending e 0.9 / f 0.85 / none; "a a b e": copy 1.0 + 0.3, one repeat; "d d d d": 3 repeats
    np.testing.assert_allclose(r, [2.8, 2.75, 1.9, 1.0 + 0.3 - 0.5 + 0.9, -1.5])
    table = rewards_of(["a c b"])[0]
    assert RESPONSES[table.argmax()].tolist() == task.token_ids("a c b e")
    with pytest.raises(ValueError, match=r"'z' in 'a z' is not a token of the vocabulary \['a', 'b', 'c', 'd', 'e', 'f'\]"):
        gold.score(["a c b"], ["a z"])


def test_target_is_a_distribution_and_its_samples_follow_it():
    x = task.token_ids("b d a")
    lp = task.target_logps(x, RESPONSES)
    assert abs(np.exp(lp).sum() - 1) < 1e-12
    draws = task.sample_target(x, 20_000, L, np.random.default_rng(0))
    freq = np.bincount(exact.response_index(draws, V), minlength=V ** L) / len(draws)
    top = np.argsort(-lp)[:5]
    se = np.sqrt(np.exp(lp[top]) * (1 - np.exp(lp[top])) / len(draws))
    assert np.all(np.abs(freq[top] - np.exp(lp[top])) < 4 * se)


def test_prompts_and_sft_targets():
    assert [len(load_prompts("exact", s)) for s in ("train", "test", "ood")] == [17, 7, 8]
    rows = load_prompts("exact", "train")[:2]
    prompts, targets, ids = task.sft_targets(rows, L)
    assert len(targets) == 2 * task.space().sft_samples and ids[0] == f"{rows[0]['prompt_id']}/0"
    assert all(len(t.split()) == L for t in targets)
    assert (prompts, targets, ids) == task.sft_targets(rows, L)  # seeded


# ---- model, tokenizer, enumeration --------------------------------------------------------------


def test_model_is_small_and_its_vocabulary_is_the_task_s(sft, tok, tmp_path):
    assert sum(p.numel() for p in sft.parameters()) < 1_000_000
    assert sft.config.vocab_size == len(tok) == V and not tok.all_special_tokens and tok.pad_token is None
    sft.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    every = list(range(V))
    assert again.decode(every, skip_special_tokens=True) == "a b c d e f"  # no token is dropped as "special"
    assert again("f e d c b a", add_special_tokens=False).input_ids == every[::-1]


def test_enumeration_sums_to_one_and_matches_sequence_logps(sft, tok):
    prompts = ["a c b", "d d c"]
    lp = exact.policy_logps(sft, tok, prompts, L)
    assert lp.shape == (2, V ** L)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, atol=1e-9)
    cols = np.random.default_rng(0).choice(V ** L, 40, replace=False)
    direct = sequence_logps(sft, tok, [prompts[1]] * 40, [RESPONSES[c].tolist() for c in cols], batch_size=40)
    np.testing.assert_allclose(lp[1, cols], direct.numpy(), atol=1e-5)


def test_sampler_draws_only_enumerated_responses_with_their_probability(sft, tok):
    out = HFSampler(sft, tok).generate(["b a c"], 8, 1.0, L, seed=0)[0]
    lp = exact.policy_logps(sft, tok, ["b a c"], L)[0]
    for c in out:
        assert len(c.token_ids) == L and c.finish_reason == "length"
        assert abs(lp[exact.response_index([c.token_ids], V)[0]] - c.logp) < 1e-5


# ---- exact metrics against Monte Carlo -----------------------------------------------------------


def test_exact_metrics_agree_with_monte_carlo(sft, tok):
    """E_π[r], KL(π‖π_sft) and the win rate over π_sft, exact, against their sample estimates from
    4000 responses per prompt: within 4 standard errors."""
    prompts, m = ["a c b", "d a a"], 4000
    policy = perturbed(sft, seed=1)
    r = rewards_of(prompts)
    lp, ref = exact.policy_logps(policy, tok, prompts, L), exact.policy_logps(sft, tok, prompts, L)
    with exact.one_thread():
        mine = HFSampler(policy, tok, batch_size=2).generate(prompts, m, 1.0, L, seed=3)
        theirs = HFSampler(sft, tok, batch_size=2).generate(prompts, m, 1.0, L, seed=4)
        ref_of_mine = [sequence_logps(sft, tok, [p] * m, [c.token_ids for c in mine[i]], batch_size=512).numpy()
                       for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        cols = exact.response_index([c.token_ids for c in mine[i]], V)
        sample_r = r[i, cols]
        log_ratio = np.array([c.logp for c in mine[i]]) - ref_of_mine[i]
        for value, samples in ((exact.expectation(lp[i:i + 1], r[i:i + 1])[0], sample_r),
                               (exact.kl(lp[i:i + 1], ref[i:i + 1])[0], log_ratio)):
            assert abs(samples.mean() - value) < 4 * samples.std() / math.sqrt(m), (p, value, samples.mean())
        assert exact.kl(lp[i:i + 1], ref[i:i + 1])[0] > 0.05  # the two policies really differ
        other_r = r[i, exact.response_index([c.token_ids for c in theirs[i]], V)]
        sampled = sampled_win_rate(sample_r, other_r, bootstrap=0)
        exact_wr = exact.win_rate(lp[i:i + 1], ref[i:i + 1], r[i:i + 1])
        for key in ("win", "tie", "lose"):
            q = exact_wr[key]
            assert abs(sampled[key] - q) < 4 * math.sqrt(q * (1 - q) / m) + 1e-9, (key, q, sampled[key])


# ---- Theorem 1 ----------------------------------------------------------------------------------


def test_pi_opt_on_a_tiny_case_is_the_hand_closed_form_and_the_brute_force_maximum():
    """Three responses, two prompts, π_opt worked out by hand: π_sft = (1/2, 1/4, 1/4) and
    r = α·(0, ln 2, ln 4) give π_sft·e^{r/α} = (1/2, 1/2, 1), so π_opt = (1/4, 1/4, 1/2) and the optimum
    of Eq. 2 is α·ln Z = α·ln 2; π_sft = (0.2, 0.3, 0.5), α = 0.5 and r = 0.5·(ln 3, ln 2, 0) give
    (0.6, 0.6, 0.5)/1.7. Neither closed form nor code of the library finds the brute-force maximum
    of E_π[r] − α·KL(π‖π_sft) over a 1/300 grid of the simplex: it is within one grid step of both."""
    ref = np.log([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    alpha = np.array([0.7, 0.5])
    r = alpha[:, None] * np.log([[1.0, 2.0, 4.0], [3.0, 2.0, 1.0]])
    hand = np.array([[0.25, 0.25, 0.5], [6 / 17, 6 / 17, 5 / 17]])
    np.testing.assert_allclose(np.exp(exact.optimal_logps(ref, r, alpha)), hand, rtol=1e-12)
    np.testing.assert_allclose(theory.optimal_policy(r, alpha, -ref).numpy(), hand, rtol=1e-12)  # Eq. 5, β = −log π_sft
    np.testing.assert_allclose(np.exp(exact._tilted(ref[:1], r[:1], 0.7)), hand[:1], rtol=1e-12)
    step = 1 / 300
    a, b = np.meshgrid(np.arange(301) * step, np.arange(301) * step, indexing="ij")
    grid = np.stack([a, b, 1 - a - b], -1)[(a + b) <= 1 + 1e-12]  # (45_451, 3) points of the simplex
    grid = np.clip(grid, 0, 1)
    for i in range(2):
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(grid > 0, grid * (np.log(grid) - ref[i]), 0.0).sum(1)
        objective = grid @ r[i] - alpha[i] * kl
        assert np.abs(grid[objective.argmax()] - hand[i]).max() <= step
        value = alpha[i] * np.log(np.exp(ref[i] + r[i] / alpha[i]).sum())
        assert objective.max() <= value + 1e-12 and objective.max() == pytest.approx(value, abs=1e-4)
    np.testing.assert_allclose(exact.expectation(np.log(hand), r) - alpha * exact.kl(np.log(hand), ref),
                               [0.7 * np.log(2), 0.5 * np.log(1.7)], rtol=1e-12)


def test_pi_opt_by_enumeration_is_theorem_1(sft, tok):
    """π_opt ∝ π_sft·e^{r/α} over all 1296 responses equals the tilted softmax written out here in
    numpy (the tiny case above checks both against a hand closed form and brute force), and it
    maximises Eq. 2: E[r] − α·KL at π_opt is α·log E_{π_sft}[e^{r/α}] and no other policy
    (trained-like perturbations, π_sft) gets more."""
    prompts = ["a c b", "c c a", "b d a"]
    ref, r = exact.policy_logps(sft, tok, prompts, L), rewards_of(prompts)
    sigma = exact.reward_std(ref, r)
    for alpha in (0.5 * sigma, 0.3):
        opt = exact.optimal_logps(ref, r, alpha)
        by_hand = ref + r / np.broadcast_to(alpha, (3,))[:, None]
        by_hand = by_hand - np.log(np.exp(by_hand).sum(1, keepdims=True))
        np.testing.assert_allclose(opt, by_hand, atol=1e-9)
        a = np.broadcast_to(alpha, (3,))
        value = exact.expectation(opt, r) - a * exact.kl(opt, ref)
        np.testing.assert_allclose(value, a * np.log((np.exp(ref) * np.exp(r / a[:, None])).sum(1)), atol=1e-9)
        for seed in (1, 2):
            other = exact.policy_logps(perturbed(sft, seed), tok, prompts, L)
            assert np.all(exact.expectation(other, r) - a * exact.kl(other, ref) < value)
    assert np.allclose(exact._tilted(ref, r, 0.3), exact.optimal_logps(ref, r, 0.3), atol=1e-12)


def test_frontier_and_matched_alpha(sft, tok):
    prompts = ["a c b", "b c c"]
    ref, r = exact.policy_logps(sft, tok, prompts, L), rewards_of(prompts)
    front = exact.frontier(ref, r, [0.1, 0.3, 1.0, 3.0])
    assert front["kl"] == sorted(front["kl"], reverse=True) and front["reward"] == sorted(front["reward"], reverse=True)
    alpha = exact.matched_alpha(ref, r, 0.7)
    assert abs(exact.frontier_point(ref, r, alpha)[1] - 0.7) < 1e-6
    assert exact.matched_alpha(ref, r, 0.0) == math.inf
    assert exact.matched_alpha(ref, r, 1e3) is None  # beyond what any α reaches


# ---- the other exact metrics against brute force --------------------------------------------------


def _small(seed=0, P=2, N=30):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, P, N))
    lp, ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return lp, ref, np.round(rng.normal(size=(P, N)), 1)  # rounded: reward ties


def test_win_rate_and_misalignment_match_brute_force():
    lp, ref, r = _small()
    p, q = np.exp(lp), np.exp(ref)
    d = r[:, :, None] - r[:, None, :]
    pair = p[:, :, None] * q[:, None, :]
    got = exact.win_rate(lp, ref, r)
    assert abs(got["win"] - (pair * (d > 0)).sum((1, 2)).mean()) < 1e-12
    assert abs(got["tie"] - (pair * (d == 0)).sum((1, 2)).mean()) < 1e-12
    lp[0, :3] = ref[0, :3]  # log-ratio ties count as misaligned
    assert exact.misalignment_rate(lp, ref, r) == pytest.approx(theory.misalignment_rate(lp, ref, r), abs=1e-12)


def test_eq12_residuals_match_brute_force():
    lp, ref, r = _small(1, P=2, N=12)
    gamma, sigma = 0.5, np.array([0.7, 1.3])
    a = (lp - ref) - r / (gamma * sigma[:, None])
    pairs = [(i, j) for i, j in itertools.combinations(range(12), 2)]
    brute = np.sqrt(np.mean([np.mean([(a[b, i] - a[b, j]) ** 2 for i, j in pairs]) for b in range(2)]))
    assert exact.eq12_rms(lp, ref, r, sigma, gamma) == pytest.approx(brute, rel=1e-12)
    w = np.exp(ref)
    weighted = np.sqrt(np.mean([(w[b][:, None] * w[b][None, :] * (a[b][:, None] - a[b][None, :]) ** 2).sum() for b in range(2)]))
    assert exact.eq12_rms(lp, ref, r, sigma, gamma, weights=w) == pytest.approx(weighted, rel=1e-12)
    res = theory.eq12_residual(lp, ref, r, gamma).numpy()
    upper = np.triu(np.ones((12, 12), dtype=bool), 1)
    assert exact.candidate_eq12_rms(lp, ref, r, gamma) == pytest.approx(np.sqrt((res[:, upper] ** 2).mean()), rel=1e-12)


def test_near_tie_is_the_best_response_and_its_best_sibling(sft, tok):
    prompts = ["a c b", "b c c"]
    ref, r = exact.policy_logps(sft, tok, prompts, L), rewards_of(prompts)
    tie = exact.near_tie(ref, ref, r, np.ones(2), 1.0, V)
    assert [task.text(RESPONSES[c]) for c in tie["best"]] == ["a c b e", "b c a e"]  # "b c c e" loses 0.5 to the repeat
    assert [task.text(RESPONSES[c]) for c in tie["second"]] == ["a c b f", "b c a f"]
    np.testing.assert_allclose(tie["r_best"] - tie["r_second"], 0.05)
    np.testing.assert_allclose(tie["last_best"] + tie["last_second"] + tie["last_other"], 1.0)
    np.testing.assert_allclose(tie["gap"], 0.0)  # π = π_sft


def test_the_sft_fit_prefers_the_slightly_worse_ending(tok, sft, tmp_path):
    """README: ``random:exact`` is fitted by the SFT stage (params/exact.yaml as it is) to a known
    Markov target that prefers the slightly worse ending. The target puts more mass on y☆ (ending f,
    reward 0.05 lower) than on y★ (ending e) on every train prompt (×e or ×e^0.5 after a d); the fitted
    π_sft (64 target samples per prompt) does on 16 of the 17, by the target's factor on average, and
    is far closer to the target than the untrained model."""
    from vcb_lib.runner import thread_limit
    from vcb_lib.stages import artefacts, sft_and_reward

    cfg = load_params("params/exact.yaml", [f"run.output_root={tmp_path}"])
    with thread_limit(cfg.run.threads):
        sft_and_reward.run(cfg, log=lambda *a, **k: None)
        fitted = load_policy(artefacts.sft_spec(cfg))
        prompts = [row["prompt"] for row in load_prompts("exact", "train")]
        r = rewards_of(prompts)
        target = np.stack([task.target_logps(task.token_ids(p), RESPONSES) for p in prompts])
        fit, untrained = (exact.policy_logps(m, tok, prompts, L) for m in (fitted, sft))
    ties = {name: exact.near_tie(lp, lp, r, np.ones(len(prompts)), 1.0, V) for name, lp in (("target", target), ("fit", fit))}
    for tie in ties.values():
        np.testing.assert_allclose(tie["r_best"] - tie["r_second"], 0.05, atol=1e-12)
        assert {task.text(RESPONSES[c])[-1] for c in tie["best"]} == {"e"} and {task.text(RESPONSES[c])[-1] for c in tie["second"]} == {"f"}
    log_ratio = {name: np.log(tie["p_second"] / tie["p_best"]) for name, tie in ties.items()}
    np.testing.assert_allclose(np.sort(np.unique(log_ratio["target"].round(9))), [0.5, 1.0])  # token f: 1.5 vs e: 0.5 (+0.5 after d)
    assert (log_ratio["fit"] > 0).sum() >= 16 and abs(log_ratio["fit"].mean() - log_ratio["target"].mean()) < 0.2
    assert exact.kl(target, fit).mean() < 0.5 * exact.kl(target, untrained).mean()


# ---- the cap --------------------------------------------------------------------------------------


def test_enumeration_over_the_cap_names_the_cap_and_the_values(sft, tok):
    with pytest.raises(ValueError, match=r"\|V\|\^L = 6\^5 = 7_776 responses per prompt, over the cap of 4_096"):
        task.check_space(6, 5)
    with pytest.raises(ValueError, match=r"6\^5 = 7_776 .* over the cap of 4_096"):
        exact.policy_logps(sft, tok, ["a c b"], 5)
    with pytest.raises(ConfigError, match=r"sampling.max_new_tokens: .*6\^5 = 7_776 .*cap of 4_096"):
        load_params("params/exact.yaml", ["sampling.max_new_tokens=5"])
    assert task.check_space(6, 4) == 1296 and task.check_space(2, 12) == 4096


# ---- VCB with the real Trainer ----------------------------------------------------------------------


EQ12_TOLERANCE = 0.05  # root mean square of Eq. 12's residual on D_t's candidate pairs (nats)


def test_vcb_trained_long_enough_satisfies_eq12_on_its_candidates(sft, tok, tmp_path):
    """The real Trainer and vcb_loss on a real D_t (n candidates per prompt sampled from π_sft):
    after 150 steps the root mean square of (Δ_i − Δ_j) − (r_i − r_j)/(γσ_r) over every candidate
    pair is below EQ12_TOLERANCE (π_sft's: ~1-3), i.e. VCB reaches Eq. 15 on its candidates."""
    from vcb_lib.trainers import Trainer

    rows = load_prompts("exact", "train")[:6]
    with exact.one_thread():
        table = build_candidates(rows, HFSampler(sft, tok), tmp_path / "dt", n=6, temperature=1.0, max_new_tokens=L,
                                 seed=0, ref_model=sft, tokenizer=tok, progress=False)
        table["reward"] = gold_reward("exact").score(list(table.prompt), list(table.response))
        groups = candidate_groups(table)
        gamma = 0.5
        cfg = TrainingConfig(methods=["vcb"], gamma=gamma, learning_rate=3e-3, batch_size=6, warmup_steps=0,
                             epochs=150, log_with="none")
        trainer = Trainer(copy.deepcopy(sft).train(), tok, groups, "vcb", cfg, tmp_path / "vcb", seed=0)
        trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        grid = lambda model: np.stack([sequence_logps(model, tok, [g.prompt] * len(g.response_ids), g.response_ids).numpy()
                                       for g in groups]).astype(np.float64)  # (6, n)
        rewards = np.array([g.rewards for g in groups])
        before = exact.candidate_eq12_rms(grid(sft), grid(sft), rewards, gamma)
        after = exact.candidate_eq12_rms(grid(policy), grid(sft), rewards, gamma)
    assert before > 0.5 and after < EQ12_TOLERANCE, (before, after)


# ---- the stages: stage 04's exact key, the point summary, the figures and the report ------------------


def test_stages_add_exact_metrics_that_the_report_and_the_panel_read(tmp_path):
    """Stages 01-05 of params/exact.yaml, shrunk (one method, few steps), as the notebooks run them:
    stage 04 adds ``exact`` beside the sampled metrics, under the same names; the sampled estimate of
    π_sft's reward agrees with the exact value; a sweep/panel point's row carries the exact values;
    notebook 05 draws the near-tie and the report says what was measured."""
    from vcb_lib import report
    from vcb_lib.runner import thread_limit
    from vcb_lib.stages import ablations, analysis, evaluate, generate, sft_and_reward, train

    cfg = load_params("params/exact.yaml", [f"run.output_root={tmp_path}", "training.methods=[vcb]", "training.epochs=20",
                                            "models.sft_epochs=1", "evaluation.samples_per_prompt=64", "evaluation.bootstrap=20",
                                            "evaluation.pool_candidates=4"])
    quiet = lambda *a, **k: None  # noqa: E731
    with thread_limit(cfg.run.threads):
        sft_and_reward.run(cfg, log=quiet)
        generate.run(cfg, log=quiet)
        train.run(cfg, log=quiet)
        metrics = evaluate.run(cfg, log=quiet)
        _, figures = analysis.run(cfg)
    ex = metrics["exact"]
    assert ex["exact"] is True and ex["responses_per_prompt"] == 1296 and ex["prompts"] == {"train": 17, "test": 7}
    assert set(ex["reward_kl"]) == {"sft", "vcb", "opt"} and ex["reward_kl"]["sft"]["kl"] == 0.0
    assert ex["win_rate"]["sft"]["win_rate_ci"] is None and ex["misalignment_rate"]["sft"] is None
    assert ex["dt"]["ref_logp_max_error"] < 1e-4  # D_t's stored log π_sft is the enumeration's
    # π_opt (Eq. 15, one α = γσ_r(x) per prompt) is one policy at its mean KL: the frontier (one α for
    # all prompts, the most reward at that mean KL) has at least its reward, and it moved off π_sft
    opt, sft_m = ex["train"]["opt"], ex["train"]["sft"]
    assert opt["kl"] > 0.05 and opt["reward"] > sft_m["reward"] and opt["regret"] >= -1e-6
    assert opt["frontier_reward"] >= opt["reward"] - 1e-6 and sft_m["kl_to_opt"] > 0.05
    assert ex["train"]["vcb"]["eq12_rms_candidates"] < ex["train"]["sft"]["eq12_rms_candidates"]
    # the sampled evaluation (64 samples x 7 test prompts) estimates what the enumeration computes
    samples = evaluate.read_samples(cfg, "test")
    by_prompt = samples[samples.method == "sft"].groupby("prompt_id").gold
    se = math.sqrt((by_prompt.var() / by_prompt.count()).sum()) / by_prompt.ngroups  # of the mean of 7 prompt means
    assert abs(by_prompt.mean().mean() - ex["reward_kl"]["sft"]["reward"]) < 4 * se
    row = ablations.summarise_point(metrics)
    assert row["exact"] and row["reward"] == ex["reward_kl"]["vcb"]["reward"] and row["win_rate_lo"] == row["win_rate_hi"]
    assert row["regret"] == ex["test"]["vcb"]["regret"] and row["train_kl"] == ex["train"]["vcb"]["kl"]
    assert figures["exact_near_tie"].is_file() and figures["exact_reward_vs_kl"].is_file()
    text = report.write_report(cfg, metrics, cfg.stage_dir("figures")).read_text()
    assert "## Exact tier: every response enumerated (6^4 = 1,296 per prompt)" in text
    assert "**Does VCB reach Eq. 15 on its candidates?**" in text and "Where the mass of the responses D_t never" in text


def test_run_threads_limits_this_process_and_its_children_and_changes_no_artefact(monkeypatch):
    """``run.threads`` (params/exact.yaml: 1): inside ``thread_limit`` torch and the environment that
    kernels and trainers inherit (``launch`` reads OMP_NUM_THREADS) use that many threads; both are
    restored after; it is not part of any artefact's key."""
    import os

    from vcb_lib.launch import launch_command
    from vcb_lib.runner import thread_limit

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with thread_limit(1):
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        cmd = launch_command(["-m", "x"], 1, None, True)
        assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "1"
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ
    one, default = load_params("params/exact.yaml"), load_params("params/exact.yaml", ["run.threads=0"])
    assert one.run.threads == 1 and one.hash() == default.hash() and one.slice("run") == default.slice("run")
