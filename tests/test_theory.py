"""Tabular theory (vcb_lib.theory): Theorem 1, Table 1 / Eq. 13, Eq. 2, Eq. 12/15, Figure 1, A.5.

Every closed form is compared with an independent numerical optimum (L-BFGS + Newton polish on
softmax tables, or a loss of vcb_lib.losses minimised over a tabular policy), never with itself.
"""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vcb_lib import plots
from vcb_lib import theory as T
from vcb_lib.config import TheoryConfig
from vcb_lib.io import _jsonable
from vcb_lib.losses import LossType, vcb_loss

TOL = 1e-8  # closed form vs numerical maximiser (max abs probability difference)
FIT_TOL = 1e-6  # converged loss minimiser vs closed form
GAMMA = 1.0
PSI_GAMMA = 0.7  # ≠ 1, so that a γ dropped from ψ (SLiC: -γ log π vs -log π) is caught


@pytest.fixture(scope="module")
def problem():
    return T.random_problem(n_instances=4, n_prompts=3, n_responses=5, seed=0)


# --------------------------------------------------------------------------------------------
# Theorem 1 (Eq. 5)
# --------------------------------------------------------------------------------------------


def test_optimal_policy_known_values():
    # r = (0, log 2), α = 1, β = 0 -> (1/3, 2/3); β shifts logits the other way.
    p = T.optimal_policy([0.0, math.log(2.0)], 1.0)
    assert p.shape == (2,) and torch.allclose(p, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    p = T.optimal_policy([[0.0, 0.0]], [2.0], [[0.0, -math.log(3.0)]])
    assert torch.allclose(p, torch.tensor([[0.25, 0.75]], dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), [1.0, 0.0]])
def test_optimal_policy_rejects_nonpositive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        T.optimal_policy(np.zeros((2, 3)), alpha)


@pytest.mark.parametrize("seed", [0, 1])
def test_theorem1_closed_form_equals_numerical_maximum(seed):
    pb = T.random_problem(4, 3, 5, seed=seed)
    check = T.check_theorem1(pb)
    assert check["max_abs_err"] <= TOL, check["max_abs_err"]
    assert check["grad_max"] <= 1e-10


def test_numerical_maximiser_tells_a_wrong_closed_form_apart(problem):
    """The comparison can fail: β with the wrong sign is far from the numerical optimum."""
    num = T.maximise_objective(problem.rewards, T.theorem1_psi(problem.alpha, problem.beta), problem.d)["probs"]
    wrong = torch.softmax(problem.rewards / problem.alpha[:, None] + problem.beta, -1)
    assert (num - wrong).abs().max() > 1e-2


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_closed_form_beats_every_other_table(seed):
    """Eq. 3 at π_opt is ≥ at any other policy (no solver involved)."""
    g = torch.Generator().manual_seed(seed)
    r, beta = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    alpha = 0.1 + 2 * torch.rand(2, generator=g, dtype=torch.float64)
    psi = T.theorem1_psi(alpha, beta)
    best = T.objective(T.optimal_log_policy(r, alpha, beta), r, psi)
    other = torch.log_softmax(torch.randn(2, 4, generator=g, dtype=torch.float64) * 3, -1)
    assert T.objective(other, r, psi) <= best + 1e-12


# --------------------------------------------------------------------------------------------
# Table 1 (RRHF, SLiC, DPO), Eq. 13 (VCB), Eq. 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", T.PSI_FORMS)
def test_each_psi_reduces_to_theorem1(problem, method):
    form = T.psi_form(method, problem.rewards, problem.ref_logps, PSI_GAMMA)
    # ψ as the paper writes it is -α[log π + β] with the (α, β) the paper derives ...
    probe = torch.log_softmax(torch.randn(problem.rewards.shape, dtype=torch.float64), -1)
    assert torch.allclose(form.psi(probe), -form.alpha[:, None] * (probe + form.beta), atol=1e-14, rtol=0)
    # ... so maximising Eq. 3 with that ψ lands on Theorem 1's π for (α, β) ...
    num = T.maximise_objective(problem.rewards, form.psi, problem.d)["probs"]
    closed = form.optimal_policy(problem.rewards)
    assert (num - closed).abs().max() <= TOL
    # ... which is the π_opt printed in Table 1 / Eq. 15.
    assert (closed - T.table1_policy(method, problem.rewards, problem.ref_logps, PSI_GAMMA)).abs().max() <= 1e-12


def test_vcb_alpha_is_gamma_sigma(problem):
    form = T.vcb_psi(problem.rewards, problem.ref_logps, 0.3)
    sigma = torch.from_numpy(problem.rewards.numpy().std(axis=1))  # numpy: ddof=0, Eq. 10
    assert torch.allclose(form.alpha, 0.3 * sigma)
    assert torch.allclose(form.beta, -problem.ref_logps)


def test_kl_form_eq2_equals_dpo_optimum(problem):
    num = T.maximise_kl_objective(problem.rewards, problem.ref_logps, PSI_GAMMA, problem.d)["probs"]
    dpo = T.dpo_psi(problem.rewards, problem.ref_logps, PSI_GAMMA).optimal_policy(problem.rewards)
    assert (num - dpo).abs().max() <= TOL
    # and it is not RRHF's/SLiC's optimum, which ignore π_sft
    assert (num - T.slic_psi(problem.rewards, PSI_GAMMA).optimal_policy(problem.rewards)).abs().max() > 1e-3


def test_psi_forms_validate(problem):
    with pytest.raises(ValueError, match="gamma"):
        T.psi_form("slic", problem.rewards, gamma=0.0)
    with pytest.raises(ValueError, match="ref_logps"):
        T.psi_form("dpo", problem.rewards)
    with pytest.raises(ValueError, match="allowed"):
        T.psi_form("ppo", problem.rewards)
    with pytest.raises(ValueError, match="alpha"):  # σ_r = 0: Theorem 1 does not apply
        T.vcb_psi(np.ones((1, 3)), np.log(np.full((1, 3), 1 / 3)), 1.0).optimal_policy(np.ones((1, 3)))


# --------------------------------------------------------------------------------------------
# VCB's loss over a tabular policy: Eq. 15 and Eq. 12
# --------------------------------------------------------------------------------------------


def test_reward_std_is_eq10_and_matches_the_loss(problem):
    sigma = T.reward_std(problem.rewards)
    assert np.allclose(sigma.numpy(), problem.rewards.numpy().std(axis=1, ddof=0))
    _, metrics = vcb_loss(problem.ref_logps, problem.ref_logps, problem.rewards, gamma=1.0)
    assert math.isclose(metrics["vcb/sigma_r"].item(), sigma.mean().item(), rel_tol=1e-12)


@pytest.mark.parametrize("reduction", ["logsumexp", "mean"])
def test_vcb_loss_minimiser_is_eq15_and_satisfies_eq12(problem, reduction):
    fit = T.fit_tabular("vcb", problem.rewards, problem.ref_logps, optimizer="lbfgs", steps=500, gamma=GAMMA,
                        lam=0.5, reduction=reduction)
    eq15 = T.eq15_policy(problem.rewards, problem.ref_logps, GAMMA)
    assert (fit["probs"] - eq15).abs().max() <= FIT_TOL
    assert T.eq12_residual(fit["logps"], problem.ref_logps, problem.rewards, GAMMA).abs().max() <= FIT_TOL
    assert fit["final_loss"] <= 1e-10  # the loss' minimum value is 0 exactly when Eq. 12 holds
    # a different γ gives a measurably different optimum (the check can fail)
    assert (fit["probs"] - T.eq15_policy(problem.rewards, problem.ref_logps, 2 * GAMMA)).abs().max() > 1e-2


def test_vcb_minimiser_restricted_to_valid_candidates():
    """Sampled candidates carry part of π_sft's mass and some are padding: Eq. 15 restricted."""
    g = torch.Generator().manual_seed(3)
    r = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), -1) - 2.0  # unnormalised
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    fit = T.fit_tabular("vcb", r, ref, mask=mask, optimizer="lbfgs", steps=500, gamma=0.5)
    eq15 = T.eq15_policy(r, ref, 0.5, mask)
    assert (fit["probs"] - eq15).abs().max() <= FIT_TOL
    assert torch.all(fit["probs"][~mask] == 0) and torch.allclose(fit["probs"].sum(-1), torch.ones(3, dtype=torch.float64))
    assert T.eq12_residual(fit["logps"].masked_fill(~mask, 0.0), ref, r, 0.5, mask).abs().max() <= FIT_TOL


def test_equal_rewards_keep_pi_sft():
    """σ_r = 0: Eq. 12 asks for equal log-ratios, i.e. π_sft restricted; the loss agrees."""
    r = torch.tensor([[0.1, 0.1, 0.1], [0.0, 1.0, 2.0]], dtype=torch.float64)
    ref = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]], dtype=torch.float64))
    eq15 = T.eq15_policy(r, ref, GAMMA)
    assert torch.allclose(eq15[0], ref[0].exp(), atol=1e-15)
    fit = T.fit_tabular("vcb", r, ref, optimizer="lbfgs", steps=300, gamma=GAMMA,
                        init_logits=torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 3.0]]))
    assert (fit["probs"] - eq15).abs().max() <= FIT_TOL


@settings(max_examples=25, deadline=None)
@given(st.floats(-5, 5), st.floats(0.1, 10))
def test_eq15_invariant_to_reward_shift_and_scale(shift, scale):
    r = torch.tensor([[0.1, 0.85, 0.9, -0.3]], dtype=torch.float64)
    ref = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    assert torch.allclose(T.eq15_policy(r, ref, 0.7), T.eq15_policy(scale * r + shift, ref, 0.7), atol=1e-12)


# --------------------------------------------------------------------------------------------
# Order-based losses: order respected, values ignored
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def order_fits(problem):
    return T.check_order_based(problem, GAMMA, steps=100, lr=0.1)


def test_order_based_fits_respect_the_reward_order(order_fits):
    for method in ("dpo", "ipo", "vcb"):  # calibrate log π/π_sft: A.5's quantity
        assert order_fits[method]["misaligned_log_ratio"] == 0.0, method
    for method in ("slic", "rrhf"):  # calibrate raw log π (Table 1: no π_sft)
        assert order_fits[method]["misaligned_logp"] == 0.0, method
    for method in T.ORDER_METHODS:  # ... but their gaps are not proportional to reward gaps
        assert order_fits[method]["eq12_max_abs_err"] > 0.1, method


def test_ipo_converges_to_rank_spacing(problem):
    check = T.check_ipo_fit(problem, GAMMA)
    assert check["max_abs_err"] <= FIT_TOL
    # closed form: consecutive log-ratio gaps (in reward order) all equal 1/(γ n)
    n = problem.rewards.shape[1]
    delta = torch.log(torch.as_tensor(check["closed"])) - problem.ref_logps
    sorted_delta = torch.gather(delta, 1, problem.rewards.argsort(-1))
    assert torch.allclose(sorted_delta.diff(dim=-1), torch.full((1,), 1 / (GAMMA * n), dtype=torch.float64))


def test_dpo_drives_gaps_apart():
    r = torch.tensor([list(T.FIGURE1_REWARDS)], dtype=torch.float64)
    ref = torch.full((1, 3), -math.log(3), dtype=torch.float64)
    short = T.fit_tabular("dpo", r, ref, steps=50, lr=0.1, gamma=GAMMA)
    long = T.fit_tabular("dpo", r, ref, steps=200, lr=0.1, gamma=GAMMA)
    gap = lambda f: (f["log_ratios"].max() - f["log_ratios"].min()).item()  # noqa: E731
    assert gap(long) > gap(short) + 1.0 and long["final_loss"] < short["final_loss"]
    conv = T.fit_tabular("dpo", r, ref, optimizer="lbfgs", steps=200, gamma=GAMMA)
    assert conv["probs"][0, 2] > 1 - 1e-6  # the limit: all mass on the best response


def test_slic_without_sft_stops_at_the_margin():
    r = torch.tensor([list(T.FIGURE1_REWARDS)], dtype=torch.float64)
    ref = torch.full((1, 3), -math.log(3), dtype=torch.float64)
    fit = T.fit_tabular("slic", r, ref, steps=200, lr=0.1, gamma=GAMMA, delta=1.0, sft_weight=0.0)
    gaps = fit["logps"][0].diff()
    assert fit["final_loss"] == 0.0 and torch.all(GAMMA * gaps >= 1.0)  # every hinge satisfied


def test_order_based_blind_to_reward_values():
    kw = dict(gamma=GAMMA, steps=40, lr=0.1)
    a = T.figure1_example((0.1, 0.85, 0.9), **kw)
    b = T.figure1_example((0.1, 0.15, 0.9), **kw)  # same order, y_2 now close to y_1
    diff = T.value_blindness(a, b)
    assert all(diff[m] == 0.0 for m in T.ORDER_METHODS), diff
    assert diff["vcb"] > 0.1


def test_figure1_example():
    fig = T.figure1_example(gamma=GAMMA, steps=120, lr=0.1)
    probs = fig["probs"]
    for method, p in probs.items():
        assert np.isclose(p.sum(), 1.0) and np.all(p > 0), method
    p1, p2, p3 = probs["vcb"]
    assert p2 > 5 * p1 and p3 > p2 and abs(p3 - p2) < abs(p2 - p1) / 4  # y2 ≈ y3 ≫ y1
    assert np.abs(probs["vcb"] - probs["vcb_eq15"]).max() < 2e-3  # finite Adam budget
    for method in ("dpo", "ipo", "slic"):  # order-based: y2 sits closer to y1 than to y3
        q1, q2, q3 = probs[method]
        assert q1 < q2 < q3 and abs(q2 - q1) < abs(q3 - q2), (method, probs[method])
    assert np.allclose(probs["sft"], 1 / 3)
    with pytest.raises(ValueError, match="ref_probs"):
        T.figure1_example(ref_probs=[0.5, 0.5], steps=1)


def test_fit_tabular_accepts_names_enums_and_functions():
    r = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    ref = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    a = T.fit_tabular(LossType.VCB, r, ref, steps=3, gamma=1.0)
    b = T.fit_tabular("VCB", r, ref, steps=3, gamma=1.0)
    c = T.fit_tabular(vcb_loss, r, ref, steps=3, gamma=1.0)
    assert torch.equal(a["probs"], b["probs"]) and torch.equal(a["probs"], c["probs"])
    assert a["loss_curve"].shape == (4,) and a["logps_curve"].shape == (4, 1, 2)
    with pytest.raises(ValueError, match="unknown loss type"):
        T.fit_tabular("ppo", r, ref)
    with pytest.raises(ValueError, match="optimizer"):
        T.fit_tabular("vcb", r, ref, optimizer="sgd", gamma=1.0)


# --------------------------------------------------------------------------------------------
# App. A.5: misalignment rate
# --------------------------------------------------------------------------------------------


def test_misalignment_zero_for_ordered_one_for_reversed():
    r = np.array([[0.1, 0.85, 0.9], [0.0, 1.0, 2.0]])
    ref = np.log(np.array([[0.2, 0.3, 0.5], [0.9, 0.09, 0.01]]))
    assert T.misalignment_rate(ref + 0.5 * r, ref, r) == 0.0
    assert T.misalignment_rate(ref - 0.5 * r, ref, r) == 1.0
    # the log-RATIO is what counts: in prompt 2, log π itself is ordered against the rewards
    assert T.misalignment_rate(ref + 0.5 * r, None, r) == 0.5


def test_misalignment_hand_computed_mixed_case_with_mask_and_ties():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 0.0, 5.0]])
    policy = torch.tensor([[0.0, 0.5, 0.2, 0.0], [0.0, -1.0, -1.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    # prompt 0: (y1,y2) ok, (y1,y3) ok, (y2,y3) misaligned -> 1/3
    # prompt 1: (y1,y2) reward tie, excluded; (y1,y3) ok; (y2,y3) log-ratio tie -> misaligned: 1/2
    rate, per = T.misalignment_rate(policy, torch.zeros_like(policy), r, mask, per_prompt=True)
    assert rate == pytest.approx(2 / 5) and np.allclose(per, [1 / 3, 1 / 2])
    # without the mask the padded response (reward 0 / 5, NaN log-prob) would add pairs
    assert T.misalignment_rate(policy.nan_to_num(), torch.zeros_like(policy), r) != pytest.approx(2 / 5)


def test_misalignment_no_pairs_is_nan():
    rate, per = T.misalignment_rate([[0.0, 1.0], [0.0, 1.0]], [[0.0, 0.0]] * 2, [[1.0, 1.0], [1.0, 2.0]],
                                    per_prompt=True)
    assert rate == 0.0 and math.isnan(per[0]) and per[1] == 0.0
    assert math.isnan(T.misalignment_rate([[0.0, 1.0]], [[0.0, 0.0]], [[1.0, 1.0]]))
    assert T.misalignment_rate([[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 2.0]]) == 1.0  # π = π_sft: ties misalign


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=2, max_size=8, unique=True), st.floats(0.01, 10))
def test_misalignment_property_monotone_log_ratios(rewards, c):
    r = np.array([rewards]) / 100.0  # distinct rewards at least 0.01 apart
    ref = np.log(np.full_like(r, 1 / r.size))
    assert T.misalignment_rate(ref + c * r, ref, r) == 0.0
    assert T.misalignment_rate(ref - c * r, ref, r) == 1.0


# --------------------------------------------------------------------------------------------
# run_checks: notebook 00's numbers, verdicts and figures
# --------------------------------------------------------------------------------------------


def test_order_methods_are_the_losses_that_use_only_the_reward_order():
    assert set(T.ORDER_METHODS) == {"dpo", "ipo", "slic", "rrhf"}


@pytest.fixture(scope="module")
def small_run():
    return T.run_checks(TheoryConfig(n_instances=2), seed=0)


def test_run_checks_passes_on_a_small_config(small_run):
    checks = small_run["checks"]
    assert checks["passed"] is True and all(checks["checks"].values()), checks["checks"]
    # the paper's Figure 1 rewards (the default) add Figure 1's qualitative checks
    assert {"figure1_vcb_y2_close_to_y3", "figure1_dpo_y2_close_to_y1"} <= set(checks["checks"])
    assert "config_hash" not in checks  # the caller adds its provenance
    assert set(checks["order_based"]) == set(T.ORDER_METHODS) | {"vcb"}
    assert checks["tolerance"] == 1e-8 and checks["fit_tolerance"] == 1e-6


def test_run_checks_numbers_are_json_and_figure_data_is_not(small_run):
    checks = small_run["checks"]
    assert json.loads(json.dumps(checks, default=_jsonable)) == checks  # as vcb_lib.io.write_json writes it
    data = small_run["data"]
    assert data["problem"].rewards.shape == (2 * 3, 5)
    assert set(data["fig1"]["fits"]) == set(data["fig1_cubed"]["fits"]) == (set(T.ORDER_METHODS) | {"vcb"}
                                                                            | set(T.RELATIVE_METHODS))
    assert set(data["pair_gaps"]) == {"VCB (converged)", "DPO", "IPO", "SLiC", "InfoNCA (converged)",
                                      "VCB rank (converged)"}
    assert set(data["value_aware"]) == set(checks["value_aware"]) == set(T.VALUE_AWARE) | {"a2po_uniform_sft"}


@pytest.mark.parametrize("sabotage, should_fail", [
    ({"fit_tolerance": 1e-30}, {"vcb_tabular_vs_eq15", "eq12", "ipo_tabular_vs_closed_form"}),  # below float64
    ({"fit_steps": 3}, {"order_respected", "order_based_value_blind", "relatives_see_values"}),  # fits stopped
    # before the order holds (and Adam's first steps are lr·sign(gradient): the same for r and r³)
])
def test_run_checks_fails_a_sabotaged_config(sabotage, should_fail):
    checks = T.run_checks(TheoryConfig(n_instances=1, **sabotage), seed=0)["checks"]
    failed = {name for name, ok in checks["checks"].items() if not ok}
    assert checks["passed"] is False and failed == should_fail, failed


def test_run_checks_other_figure1_rewards_skip_the_paper_claims():
    checks = T.run_checks(TheoryConfig(n_instances=1, figure1_rewards=[0.1, 0.5, 0.9]), seed=0)["checks"]
    assert checks["passed"] and not any(name.startswith("figure1_") and name != "figure1_sums_to_one"
                                        for name in checks["checks"])


def _draw_theorem1(data, path):
    return plots.theorem1_scatter(data["t1"], path)


def _draw_eq12(data, path):
    return plots.eq12_proportionality(data["pair_gaps"], path)


def _draw_figure1(data, path):
    return plots.figure1_bars(data["fig1"]["probs"], T.FIGURE1_REWARDS, path, gamma=1.0, steps=150)


def _draw_trajectories(data, path):
    return plots.figure1_trajectories(data["fig1"]["fits"], T.FIGURE1_REWARDS, path)


@pytest.mark.parametrize("draw", [_draw_theorem1, _draw_eq12, _draw_figure1, _draw_trajectories],
                         ids=lambda f: f.__name__[len("_draw_"):])
def test_theory_figures_are_written(small_run, tmp_path, draw):
    path = tmp_path / "figure.png"
    fig = draw(small_run["data"], path)
    assert path.is_file() and path.stat().st_size > 1000
    plots.plt.close(fig)


def test_figure1_table_rows_are_methods_columns_responses(small_run):
    table = plots.figure1_table(small_run["data"]["fig1"]["probs"], T.FIGURE1_REWARDS)
    assert list(table.columns) == ["y1 (r=0.1)", "y2 (r=0.85)", "y3 (r=0.9)"]
    assert {"sft", "vcb", "vcb_eq15", *T.ORDER_METHODS, *T.RELATIVE_METHODS} == set(table.index)
    assert np.allclose(table.sum(axis=1), 1.0)


# --------------------------------------------------------------------------------------------
# The value-aware family (issue 19): closed forms and Eq. 12
# --------------------------------------------------------------------------------------------


def _converged(method, r, ref, **kw):
    return T.fit_tabular(method, r, ref, optimizer="lbfgs", steps=500, polish=True, **kw)


@pytest.mark.parametrize("normalize", ["prompt_std", "batch_std", "none", "rank"])
def test_vcb_options_converge_to_their_closed_form(problem, normalize):
    """VCB with each normalize option is zero exactly at π_sft·e^{s/γ}/Z, s the scaled rewards;
    the fit never sees the closed form."""
    r, ref = problem.rewards, problem.ref_logps
    fit = _converged("vcb", r, ref, gamma=0.7, normalize=normalize, eta=1.7)
    closed = T.vcb_optimum(r, ref, 0.7, normalize, eta=1.7)
    assert (fit["probs"] - closed).abs().max() <= TOL and fit["final_loss"] < 1e-20
    if normalize == "prompt_std":  # Eq. 15 itself
        assert (closed - T.eq15_policy(r, ref, 0.7)).abs().max() <= 1e-14
    if normalize == "none":  # the KL-regularised optimum of Eq. 2 / Table 1's DPO row, with γ/η
        assert (closed - T.table1_policy("dpo", r, ref, 0.7 / 1.7)).abs().max() <= 1e-14


def test_normalized_rewards_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0], [0.0, 5.0, 5.0]], dtype=torch.float64)
    rank = T.normalized_rewards(r, "rank")
    # ranks (0, 1, 2) / std sqrt(2/3); ties: (0, 1.5, 1.5) / std(0, 1.5, 1.5) = sqrt(0.5)
    assert torch.allclose(rank[0], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64) / math.sqrt(2 / 3))
    assert torch.equal(rank[1], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(rank[2], torch.tensor([0.0, 1.5, 1.5], dtype=torch.float64) / math.sqrt(0.5))
    centred = torch.tensor([-4 / 3, -1 / 3, 5 / 3, 0, 0, 0, -10 / 3, 5 / 3, 5 / 3], dtype=torch.float64)
    assert torch.allclose(T.normalized_rewards(r, "batch_std")[0], r[0] / centred.pow(2).mean().sqrt())
    assert torch.equal(T.normalized_rewards(r, "none", eta=2.0)[0], 2 * r[0])
    with pytest.raises(ValueError, match="unknown normalize 'z'"):
        T.normalized_rewards(r, "z")


def test_infonca_converges_to_softmax_r_over_alpha_relative_to_sft(problem):
    r, ref = problem.rewards, problem.ref_logps
    fit = _converged("infonca", r, ref, gamma=0.7, alpha=0.4)
    closed = T.infonca_optimum(r, ref, 0.7, 0.4)
    assert (fit["probs"] - closed).abs().max() <= TOL
    # "softmax(r/α) relative to π_sft": the implied rewards' softmax is the target softmax
    implied = torch.softmax(0.7 * fit["log_ratios"], -1)
    assert (implied - torch.softmax(r / 0.4, -1)).abs().max() <= TOL
    assert (closed - T.table1_policy("dpo", r, ref, 0.7 * 0.4)).abs().max() <= 1e-14  # Theorem 1, α(x) = αγ


@pytest.mark.parametrize("method", ["nca", "a2po"])
def test_absolute_targets_are_reached_when_the_candidates_hold_part_of_the_mass(problem, method):
    """NCA and A*-PO target each candidate's own log-ratio; with a response the loss never sees
    (the rest of the response space) the converged fit reaches :func:`nca_log_ratios` /
    :func:`a2po_log_ratios` exactly."""
    out = T.check_value_aware(problem, 0.8, alpha=0.6, value_gamma=1.3)[method]
    assert out["closed_form_max_abs_err"] <= TOL and 0 < out["candidate_share"] <= 0.5
    X, Y = problem.rewards.shape
    fit = out["fit"]
    assert fit["probs"].shape == (X, Y + 1) and fit["probs"][:, Y].min() > 0.4  # the unseen response keeps its mass
    assert torch.allclose(fit["probs"].sum(-1), torch.ones(X, dtype=torch.float64))


def test_a2po_closed_form_is_theorem1_with_the_estimated_partition(problem):
    r = problem.rewards
    delta = T.a2po_log_ratios(r, 0.5, 0.5)
    # e^{Δ} = e^{r/γ}/Ẑ with Ẑ = mean_j e^{r_j/γ}: Theorem 1's numerator over the estimated partition
    z_hat = torch.exp(r / 0.5).mean(-1, keepdim=True)
    assert torch.allclose(delta.exp(), torch.exp(r / 0.5) / z_hat, rtol=1e-12)
    # π_sft uniform on the candidates and γ' = γ: Ẑ is exact, the policy normalised, Theorem 1's π_opt
    Y = r.shape[1]
    uniform = torch.full_like(r, -math.log(Y))
    fit = _converged("a2po", r, uniform, gamma=0.5, value_gamma=0.5)
    assert (fit["probs"] - T.optimal_policy(r, 0.5)).abs().max() <= TOL and fit["final_loss"] < 1e-20
    # γ' ≠ γ: the estimated partition is off, the targets unreachable on the candidates alone
    off = _converged("a2po", r, uniform, gamma=0.5, value_gamma=2.0)
    assert (off["probs"] - T.optimal_policy(r, 0.5)).abs().max() > 1e-4 and off["final_loss"] > 1e-3


def test_which_losses_satisfy_eq12(problem):
    """Eq. 12 exactly: VCB with Eq. 10 only. Up to a per-prompt scale (gaps proportional to reward
    gaps): batch_std (σ_r/σ_B), none (η·σ_r), InfoNCA and NCA (σ_r/α), A*-PO (σ_r). Not at all:
    VCB with ranks; ODPO, whose gaps keep growing."""
    gamma, alpha = 0.8, 0.6
    va = T.check_value_aware(problem, gamma, alpha=alpha, eta=1.5, budget_steps=150)
    sigma = T.reward_std(problem.rewards)
    assert va["vcb"]["eq12_max_abs_err"] <= TOL and va["vcb"]["eq12_slope"] == pytest.approx(1.0, abs=1e-10)
    expected_slope = {"vcb_none": 1.5 * sigma.mean(), "infonca": sigma.mean() / alpha, "nca": sigma.mean() / alpha,
                      "a2po": sigma.mean()}
    for name in ("vcb_batch_std", "vcb_none", "infonca", "nca", "a2po"):
        assert va[name]["proportional_max_abs_err"] <= TOL, name
        assert va[name]["eq12_max_abs_err"] > 1e-3, name
        if name in expected_slope:
            assert va[name]["eq12_slope"] == pytest.approx(expected_slope[name].item(), rel=1e-8), name
    assert va["vcb_rank"]["proportional_max_abs_err"] > 1e-3
    assert va["odpo"]["closed_form_max_abs_err"] is None and va["odpo"]["proportional_max_abs_err"] > 1e-3
    assert all(v["misaligned_log_ratio"] == 0 for v in va.values())  # every one of them keeps the order


def test_calibration_summary_by_hand():
    r = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)
    s = T.scaled_rewards(r, 0.5)
    exact = T.calibration_summary(s, None, r, 0.5)
    assert exact["eq12_max_abs_err"] < 1e-15 and exact["eq12_slope"] == pytest.approx(1.0)
    double = T.calibration_summary(2 * s + 7.0, None, r, 0.5)  # proportional, slope 2 (a constant changes no gap)
    assert double["proportional_max_abs_err"] < 1e-14 and double["eq12_slope"] == pytest.approx(2.0)
    assert double["eq12_max_abs_err"] == pytest.approx((s[0, 2] - s[0, 0]).item())
    ranks = T.calibration_summary(torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64), None, r, 0.5)
    assert ranks["proportional_max_abs_err"] > 0.1 and ranks["misaligned_log_ratio"] == 0.0


def test_fit_tabular_support_must_cover_the_candidates_and_polish_reaches_float64():
    r = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    ref = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="support must cover"):
        T.fit_tabular("vcb", r, ref, support=torch.tensor([[True, True, False]]), gamma=1.0)
    rough = T.fit_tabular("infonca", r, ref, optimizer="lbfgs", steps=3, gamma=1.0, alpha=0.5)
    polished = T.fit_tabular("infonca", r, ref, optimizer="lbfgs", steps=3, polish=True, gamma=1.0, alpha=0.5)
    closed = T.infonca_optimum(r, ref, 1.0, 0.5)
    assert (rough["probs"] - closed).abs().max() > 1e-6 >= polished["grad_max"]
    assert (polished["probs"] - closed).abs().max() <= TOL


def test_run_checks_holds_the_value_aware_closed_forms_to_the_tolerance():
    checks = T.run_checks(TheoryConfig(n_instances=1, tolerance=1e-30), seed=0)["checks"]
    failed = {name for name, ok in checks["checks"].items() if not ok}
    assert {"value_aware_closed_forms", "value_aware_proportional"} <= failed
