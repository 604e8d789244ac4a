"""The on-policy methods' options from their peers (issue 31): the value clip's clipfrac, RLOO's
sequence-level ratio, Schulman's KL estimators, the loss aggregations, clip-higher and the dual
clip, the reward clip, the entropy bonus and PPO's critic warm-up. Each against a hand computation
on small float64 tensors; which artefact keys each option enters; the config checks."""
from __future__ import annotations

import math

import pytest
import torch

from vcb_lib import policy_gradient as pg
from vcb_lib.config import ConfigError, load_params
from vcb_lib.policy_gradient import OnlineMethod

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# The value clip: TRL's clamp(V, old - c, old + c)
# --------------------------------------------------------------------------------------------


def test_val_clipfrac_is_exactly_zero_when_nothing_is_clipped():
    """float32 values within c of their old values: no token counts as clipped and the loss is the
    plain ½(V - G)². The former V^clip = old + clamp(V - old, -c, c) differs from V by rounding
    here, and counted a share of these tokens as clipped."""
    g = torch.Generator().manual_seed(0)
    old = 0.05 * torch.randn(8, 64, generator=g)  # values near 0 of either sign, as a fresh value head's
    values = 0.05 * torch.randn(8, 64, generator=g)
    values = torch.where((values - old).abs() < 0.19, values, old)  # |V - old| < 0.2 = c
    returns = old + torch.randn(8, 64, generator=g)
    mask = torch.ones(8, 64, dtype=torch.bool)
    mask[3, 40:] = False
    losses, metrics = pg.clipped_value_loss(values, old, returns, mask, clip_value=0.2)
    assert metrics["val/clipfrac"].item() == 0.0
    torch.testing.assert_close(losses, torch.where(mask, 0.5 * (values - returns) ** 2, 0.0), rtol=0, atol=0)
    former = old + (values - old).clamp(-0.2, 0.2)  # the replaced form: not V, by rounding
    assert ((former - returns) ** 2 > (values - returns) ** 2)[mask].any()


def test_val_clipfrac_counts_the_clipped_tokens_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.52, 0.5]], dtype=F64, requires_grad=True)
    old = torch.full((1, 4), 0.5, dtype=F64)
    returns = torch.tensor([[2.0, 2.0, 0.0, 9.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    losses, metrics = pg.clipped_value_loss(values, old, returns, mask, clip_value=0.2)
    # token 0: V = 1 -> clip 0.7: max((1-2)², (0.7-2)²) = 1.69 (clipped); token 1: V = 0 -> clip 0.3:
    # max(4, 2.89) = 4 (not); token 2: V = 0.52 inside: 0.52² (not)
    torch.testing.assert_close(losses, torch.tensor([[0.5 * 1.69, 2.0, 0.5 * 0.52 ** 2, 0.0]], dtype=F64))
    assert metrics["val/clipfrac"].item() == pytest.approx(1 / 3)
    losses.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -2.0, 0.52, 0.0]], dtype=F64))  # clipped: no gradient


# --------------------------------------------------------------------------------------------
# The surrogate: clip-higher, dual clip, RLOO's sequence level
# --------------------------------------------------------------------------------------------


def _logps(ratios):
    return torch.tensor([ratios], dtype=F64).log().requires_grad_()


def test_clip_higher_and_dual_clip_equal_hand_computed_values():
    old, mask = torch.zeros(1, 5, dtype=F64), torch.ones(1, 5, dtype=torch.bool)
    ratios = [1.25, 0.75, 5.0, 2.0, 5.0]
    adv = torch.tensor([[1.0, -1.0, -1.0, -1.0, 1.0]], dtype=F64)
    # symmetric ε = 0.2: 1.25 -> 1.2 (A > 0, clipped); 0.75 with A < 0 -> max(0.75, 0.8) = 0.8 (clipped);
    # A < 0 above 1 + ε: the unclipped -A·ρ (5, 2); A > 0 at 5 -> 1.2
    losses, m = pg.clipped_policy_loss(_logps(ratios), old, adv, mask, clip=0.2)
    torch.testing.assert_close(losses, torch.tensor([[-1.2, 0.8, 5.0, 2.0, -1.2]], dtype=F64))
    assert m["policy/clipfrac"].item() == pytest.approx(3 / 5) and "policy/dual_clipfrac" not in m
    # clip-higher: ε_high = 0.28 keeps 1.25 unclipped; ε_low = 0.3 keeps 0.75 unclipped
    losses, m = pg.clipped_policy_loss(_logps(ratios), old, adv, mask, clip=0.2, clip_low=0.3, clip_high=0.28)
    torch.testing.assert_close(losses, torch.tensor([[-1.25, 0.75, 5.0, 2.0, -1.28]], dtype=F64))
    assert m["policy/clipfrac"].item() == pytest.approx(1 / 5)
    # dual clip c = 3: A < 0 losses capped at -c·A = 3 (5 -> 3, 2 stays); A > 0 untouched
    new = _logps(ratios)
    losses, m = pg.clipped_policy_loss(new, old, adv, mask, clip=0.2, dual_clip=3.0)
    torch.testing.assert_close(losses, torch.tensor([[-1.2, 0.8, 3.0, 2.0, -1.2]], dtype=F64))
    assert m["policy/dual_clipfrac"].item() == pytest.approx(1 / 5)
    losses.sum().backward()  # d(-A·ρ)/dlog ρ = -A·ρ where unclipped: only the ρ = 2 token
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="dual_clip must be 0 \\(off\\) or > 1"):
        pg.clipped_policy_loss(new, old, adv, mask, dual_clip=0.5)


ROWS_MASK = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])


def test_sequence_level_ratio_equals_hand_computed_values():
    """One ratio per response, exp(Σ_t Δlog π), clipped once with its sequence advantage; the
    sequence loss l_i stands as l_i / |y_i| on each of its tokens."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0], [-3.0, 0.0, 0.0]], dtype=F64)
    delta = torch.tensor([[0.1, 0.2, -0.05], [-0.2, -0.1, 7.0], [0.05, 9.0, 9.0]], dtype=F64)  # padding ignored
    new = (old + delta).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    losses, m = pg.sequence_clipped_policy_loss(new, old, adv, ROWS_MASK, clip=0.2)
    rho = [math.exp(0.25), math.exp(-0.3), math.exp(0.05)]  # 1.284 (> 1.2), 0.741 (< 0.8), 1.051
    l0 = max(-1.0 * rho[0], -1.0 * 1.2)  # A > 0 above 1 + ε: clipped, -1.2
    l1 = max(2.0 * rho[1], 2.0 * 0.8)  # A < 0 below 1 - ε: clipped, 1.6
    l2 = -0.5 * rho[2]  # inside: -A·ρ
    want = torch.tensor([[l0 / 3] * 3, [l1 / 2] * 2 + [0.0], [l2, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(losses, want)
    assert m["policy/clipfrac"].item() == pytest.approx(2 / 3)
    assert m["val/ratio"].item() == pytest.approx(sum(rho) / 3)
    losses.sum().backward()  # Σ_t of a row is l_i: its gradient is -A_i·ρ_i on every token where unclipped
    torch.testing.assert_close(new.grad, torch.tensor([[0.0] * 3, [0.0] * 3, [-0.5 * rho[2], 0.0, 0.0]], dtype=F64))
    # token level on the same numbers: three ratios in row 0, two clipped
    tok, _ = pg.clipped_policy_loss(new.detach(), old, torch.where(ROWS_MASK, adv[:, None], 0.0), ROWS_MASK, clip=0.2)
    assert tok[0, 0].item() == pytest.approx(-math.exp(0.1)) and tok[0, 1].item() == pytest.approx(-1.2)


def test_sequence_and_token_levels_agree_at_ratio_one_under_every_aggregation():
    """At π_new = π_old (an update's first step) the two levels give the same gradient: the level
    changes what is clipped, not the step's scale."""
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 3, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    batch = {"old_logps": old, "advantages": torch.where(ROWS_MASK, adv[:, None], 0.0), "mask": ROWS_MASK}
    for aggregation in pg.LOSS_AGGREGATIONS:
        w, units = pg.aggregation_weights(ROWS_MASK, aggregation, max_tokens=4, dtype=F64)
        grads = {}
        for level in pg.CLIP_LEVELS:
            new = old.clone().requires_grad_()
            losses, _ = pg.rloo_objective(new, None, batch, clip=0.2, clip_level=level)
            ((losses * w).sum() / units.sum()).backward()
            grads[level] = new.grad
        torch.testing.assert_close(grads["sequence"], grads["token"])


def test_rloo_objective_levels():
    old = torch.zeros(3, 3, dtype=F64)
    new = torch.where(ROWS_MASK, 0.1, 0.0).to(F64)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    batch = {"old_logps": old, "advantages": torch.where(ROWS_MASK, adv[:, None], 0.0), "mask": ROWS_MASK}
    seq, _ = pg.rloo_objective(new, None, batch, clip=0.2)  # default: sequence, as TRL's RLOOTrainer
    rho = [min(math.exp(0.3), 1.2), math.exp(0.2), math.exp(0.1)]  # row 0 clipped at 1.2 (A > 0)
    torch.testing.assert_close(seq[:, 0], torch.tensor([-rho[0] / 3, rho[1] / 2, -2 * rho[2]], dtype=F64))
    tok, _ = pg.rloo_objective(new, None, batch, clip=0.2, clip_level="token")
    torch.testing.assert_close(tok, torch.where(ROWS_MASK, -batch["advantages"] * math.exp(0.1), 0.0))
    with pytest.raises(ValueError, match="clip_level"):
        pg.rloo_objective(new, None, batch, clip=0.2, clip_level="prompt")


# --------------------------------------------------------------------------------------------
# KL estimators, reward clip, aggregation, entropy, critic warm-up
# --------------------------------------------------------------------------------------------


def test_kl_estimators_equal_hand_computed_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, 4.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    want = {"k1": [0.5, -1.0],  # d = log π_ref - log π = -0.5, 1.0
            "k2": [0.125, 0.5], "k3": [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2]}
    for est, (a, b) in want.items():
        torch.testing.assert_close(pg.kl_estimate(logp, ref, mask, est), torch.tensor([[a, b, 0.0]], dtype=F64))
    torch.testing.assert_close(pg.k3_kl(logp, ref, mask), pg.kl_estimate(logp, ref, mask, "k3"))
    with pytest.raises(ValueError, match="unknown estimator"):
        pg.kl_estimate(logp, ref, mask, "k4")


def _rollout():
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    old = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-1.0, -1.0], [-0.5, -0.5]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0], [-1.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]], dtype=F64)
    return {"scores": torch.tensor([[1.0, 3.0], [-4.0, 2.0]], dtype=F64), "old_logps": old, "ref_logps": ref, "mask": mask}


def test_the_kl_estimator_enters_each_method_where_it_reads_the_kl():
    rollout = _rollout()
    k2 = [0.125, 0.5, 0.0, 0.25]  # Σ_t ½(old - ref)² per response
    fields, m = pg.rloo_prepare(rollout, kl_coef=0.5, kl_estimator="k2")
    reward = torch.tensor([1.0 - 0.5 * k2[0], 3.0 - 0.5 * k2[1], -4.0 - 0.5 * k2[2], 2.0 - 0.5 * k2[3]], dtype=F64)
    adv = torch.stack([reward[0] - reward[1], reward[1] - reward[0], reward[2] - reward[3], reward[3] - reward[2]])
    torch.testing.assert_close(fields["advantages"][:, 0], adv)
    assert m["objective/kl"].item() == pytest.approx(sum(k2) / 4)
    auto, _ = pg.rloo_prepare(rollout, kl_coef=0.5)  # auto = k1 (TRL's default)
    k1, _ = pg.rloo_prepare(rollout, kl_coef=0.5, kl_estimator="k1")
    torch.testing.assert_close(auto["advantages"], k1["advantages"])
    # PPO: the per-token penalty -β·k3 on each token, the score on the last real one
    values = torch.zeros(4, 2, dtype=F64)
    fields, m = pg.ppo_prepare(rollout | {"old_values": values}, kl_coef=0.1, gae_gamma=1.0, gae_lambda=1.0,
                               whiten_rewards=False, kl_estimator="k3")
    rewards, kl = pg.kl_token_rewards(rollout["scores"].reshape(-1), rollout["old_logps"], rollout["ref_logps"],
                                      rollout["mask"], kl_coef=0.1, kl_estimator="k3")
    assert kl[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1) and rewards[0, 1].item() == pytest.approx(1.0)
    torch.testing.assert_close(fields["returns"][:, 0], rewards.sum(-1))  # γ = λ = 1, V = 0: reward-to-go
    # GRPO: the estimator of the loss term, auto = k3
    new = rollout["old_logps"].clone().requires_grad_()
    batch = {"old_logps": rollout["old_logps"], "ref_logps": rollout["ref_logps"], "mask": rollout["mask"],
             "advantages": torch.zeros(4, 2, dtype=F64)}
    for est, want in (("auto", "k3"), ("k1", "k1"), ("k2", "k2")):
        losses, m = pg.grpo_objective(new, None, batch, clip=0.2, kl_coef=0.3, kl_estimator=est)
        torch.testing.assert_close(losses, 0.3 * pg.kl_estimate(new, rollout["ref_logps"], rollout["mask"], want))
        assert f"kl/{want}" in m


def test_reward_clip_clips_the_scores_before_the_advantages():
    rollout = _rollout()
    torch.testing.assert_close(pg.clip_scores(rollout["scores"], 2.0), torch.tensor([[1.0, 2.0], [-2.0, 2.0]], dtype=F64))
    assert pg.clip_scores(rollout["scores"], 0.0) is rollout["scores"]
    fields, m = pg.grpo_prepare(rollout, scale_rewards="none", reward_clip=2.0)
    torch.testing.assert_close(fields["advantages"][:, 0], torch.tensor([-0.5, 0.5, -2.0, 2.0], dtype=F64))
    assert m["objective/scores"].item() == pytest.approx(0.75)
    fields, _ = pg.rloo_prepare(rollout, kl_coef=0.0, reward_clip=2.0)
    torch.testing.assert_close(fields["advantages"][:, 0], torch.tensor([-1.0, 1.0, -4.0, 4.0], dtype=F64))
    values = torch.zeros(4, 2, dtype=F64)
    fields, _ = pg.ppo_prepare(rollout | {"old_values": values}, kl_coef=0.0, gae_gamma=1.0, gae_lambda=1.0,
                               whiten_rewards=False, reward_clip=2.0)
    torch.testing.assert_close(fields["returns"][:, 0], torch.tensor([1.0, 2.0, -2.0, 2.0], dtype=F64))


def test_loss_aggregations_equal_hand_computed_values():
    """Per-token losses of three responses (3, 2, 1 tokens), reduced as Σ w·l / Σ units."""
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [6.0, 99.0, 99.0]], dtype=F64)
    want = {"token_mean": (1 + 2 + 3 + 4 + 5 + 6) / 6,
            "sequence_mean": ((1 + 2 + 3) / 3 + (4 + 5) / 2 + 6 / 1) / 3,  # GRPO's Eq. 3
            "constant": (1 + 2 + 3 + 4 + 5 + 6) / (3 * 4)}  # Dr. GRPO: / (responses × max tokens 4)
    for aggregation, value in want.items():
        w, units = pg.aggregation_weights(ROWS_MASK, aggregation, max_tokens=4, dtype=F64)
        assert ((losses * w).sum() / units.sum()).item() == pytest.approx(value, rel=1e-15)
        # split into micro-batches {0}, {1, 2}: the learner sums both, then divides: the same number
        parts = sum((losses[i] * w[i]).sum() for i in ([0], [1, 2])) / sum(units[i].sum() for i in ([0], [1, 2]))
        assert parts.item() == pytest.approx(value, rel=1e-15)
    w, units = pg.aggregation_weights(ROWS_MASK)
    assert w.dtype == torch.float32 and units.tolist() == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="constant needs max_tokens"):
        pg.aggregation_weights(ROWS_MASK, "constant")
    with pytest.raises(ValueError, match="more than max_tokens=2"):
        pg.aggregation_weights(ROWS_MASK, "constant", max_tokens=2)


def test_entropy_bonus_is_subtracted_from_the_loss():
    new = torch.log(torch.tensor([[1.0, 1.0, 1.0]], dtype=F64))
    mask = torch.tensor([[True, True, False]])
    entropy = torch.tensor([[0.7, 1.1, 5.0]], dtype=F64)
    batch = {"old_logps": torch.zeros(1, 3, dtype=F64), "advantages": torch.tensor([[1.0, 1.0, 0.0]], dtype=F64),
             "mask": mask, "ref_logps": torch.zeros(1, 3, dtype=F64), "entropy": entropy}
    losses, m = pg.grpo_objective(new, None, batch, clip=0.2, kl_coef=0.0, entropy_coef=0.01)
    torch.testing.assert_close(losses, torch.tensor([[-1 - 0.007, -1 - 0.011, 0.0]], dtype=F64))
    assert m["policy/entropy"].item() == pytest.approx(0.9)
    losses, m = pg.rloo_objective(new, None, batch, clip=0.2, clip_level="token", entropy_coef=0.0)
    assert "policy/entropy" not in m and losses[0, 0].item() == -1.0
    with pytest.raises(ValueError, match=r"needs the per-token entropies in batch\['entropy'\]"):
        pg.rloo_objective(new, None, {k: v for k, v in batch.items() if k != "entropy"}, clip=0.2, entropy_coef=0.1)


def test_ppo_critic_only_is_the_value_loss_alone():
    g = torch.Generator().manual_seed(2)
    new = torch.randn(2, 3, generator=g, dtype=F64).requires_grad_()
    values = torch.randn(2, 3, generator=g, dtype=F64).requires_grad_()
    batch = {"old_logps": torch.randn(2, 3, generator=g, dtype=F64), "old_values": torch.randn(2, 3, generator=g, dtype=F64),
             "advantages": torch.randn(2, 3, generator=g, dtype=F64), "returns": torch.randn(2, 3, generator=g, dtype=F64),
             "mask": ROWS_MASK[:2]}
    hp = dict(clip=0.2, clip_value=0.2, vf_coef=0.1)
    both, _ = pg.ppo_objective(new, values, batch, **hp)
    critic, _ = pg.ppo_objective(new, values, batch, **hp, critic_only=True)
    vf, _ = pg.clipped_value_loss(values, batch["old_values"], batch["returns"], batch["mask"], clip_value=0.2)
    torch.testing.assert_close(critic, 0.1 * vf, rtol=0, atol=0)
    assert not torch.equal(both, critic)
    critic.sum().backward()
    assert (new.grad == 0).all() and values.grad.abs().sum() > 0  # a zero gradient, not none (DDP)


# --------------------------------------------------------------------------------------------
# The keys: each option retrains only the methods that read it; the config checks
# --------------------------------------------------------------------------------------------


NEW_KEYS = {"kl_estimator": ("k2", {"ppo", "rloo", "grpo"}), "loss_aggregation": ("constant", {"ppo", "rloo", "grpo"}),
            "clip_level": ("token", {"rloo"}), "clip_low": (0.1, {"ppo", "rloo", "grpo"}),
            "clip_high": (0.28, {"ppo", "rloo", "grpo"}), "dual_clip": (3.0, {"ppo", "rloo", "grpo"}),
            "reward_clip": (5.0, {"ppo", "rloo", "grpo"}), "entropy_coef": (0.01, {"ppo", "rloo", "grpo"}),
            "critic_warmup_rounds": (1, {"ppo"})}


def test_each_option_enters_only_the_keys_of_the_methods_that_read_it():
    from vcb_lib.stages import artefacts

    base = load_params(None)
    keys = {m.value: artefacts.method_key(base, m.value) for m in OnlineMethod}
    for name, (value, readers) in NEW_KEYS.items():
        cfg = load_params(None, {f"training.online.{name}": value})
        changed = {m for m in keys if artefacts.method_key(cfg, m) != keys[m]}
        assert changed == readers, name
        assert artefacts.method_key(cfg, "vcb") == artefacts.method_key(base, "vcb")
    for m in OnlineMethod:  # what prepare and the objective take is part of the key
        assert set(m.prepare_keys) | set(m.objective_keys) <= set(m.online_keys), m


def test_the_new_keys_are_checked_and_documented():
    from vcb_lib.config import describe

    o = load_params(None).training.online
    assert (o.kl_estimator, o.loss_aggregation, o.clip_level, o.clip_low, o.clip_high, o.dual_clip, o.reward_clip,
            o.entropy_coef, o.critic_warmup_rounds) == ("auto", "token_mean", "sequence", 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    bad = {"training.online.kl_estimator=k4": r"kl_estimator: expected one of 'auto', 'k1', 'k2', 'k3'",
           "training.online.loss_aggregation=sum": r"loss_aggregation: expected one of 'token_mean'",
           "training.online.clip_level=prompt": r"clip_level: expected one of 'sequence', 'token'",
           "training.online.clip_low=1.0": r"training.online.clip_low: must be in \[0, 1\)",
           "training.online.clip_high=-0.1": r"training.online.clip_high: must be in \[0, 10\]",
           "training.online.dual_clip=0.5": r"training.online.dual_clip: must be 0 \(off\) or in \(1, 1e6\]",
           "training.online.reward_clip=-1": r"training.online.reward_clip: must be a finite number >= 0",
           "training.online.entropy_coef=-0.1": r"training.online.entropy_coef: must be a finite number >= 0",
           "training.online.critic_warmup_rounds=4": r"critic_warmup_rounds: must be in 0..rounds-1 \(3\)"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_params(None, [override])
    text = describe(load_params(None))
    for name in NEW_KEYS:
        assert any(line.strip().startswith(f"{name}:") and "  # " in line for line in text.splitlines()), name
