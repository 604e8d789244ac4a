"""The on-policy methods (issue 20): PPO, RLOO, GRPO and iterative VCB on one rollout loop.

Pure functions against hand-computed values; one PPO update on a tiny model against an independent
computation of the same losses and gradients; the KL coefficient's effect; resume after a kill
between rounds equals the uninterrupted run; NaN rewards stop with an error and all-equal rewards
give a zero-advantage round; iterative VCB's two references; two processes equal one; vLLM rounds sample
from the current policy. Tiny random models, CPU, fp32."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vcb_lib import policy_gradient as pg
from vcb_lib.config import PROJECT_ROOT, ConfigError, load_params
from vcb_lib.policy_gradient import OnlineMethod
from vcb_lib.samplers import vllm_available

SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# Pure functions against hand-computed values
# --------------------------------------------------------------------------------------------


def test_gae_equals_hand_computed_values():
    """Two responses, the second one token shorter (padding after it): δ and A by hand."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 9.0]], dtype=F64)  # 9.0 sits on padding: ignored
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = pg.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: δ2 = 1 - 0.1 = 0.9; δ1 = 0 + 0.1 - 0.2 = -0.1; δ0 = 0 + 0.2 - 0.5 = -0.3
    a2 = 0.9
    a1 = -0.1 + 0.95 * a2
    a0 = -0.3 + 0.95 * a1
    # row 1 ends after token 1 (terminal: next value 0): δ1 = -1 - 0.4; δ0 = 0.5 + 0.4 - 0.3
    b1 = -1.4
    b0 = 0.6 + 0.95 * b1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.1], [b0 + 0.3, b1 + 0.4, 0.0]], dtype=F64))
    # γ = 0.5, λ = 1: A_t = Σ_k γ^k δ_{t+k}, and returns are the discounted reward-to-go
    adv, ret = pg.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match="lam must be in"):
        pg.gae(rewards, values, mask, lam=1.5)


def test_kl_token_rewards_put_the_score_on_the_final_token():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, 5.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = pg.kl_token_rewards(torch.tensor([2.0, -1.0], dtype=F64), old, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="at least one token"):
        pg.kl_token_rewards(torch.zeros(1, dtype=F64), old[:1], ref[:1], torch.zeros(1, 3, dtype=torch.bool), kl_coef=0.1)


def test_clipped_policy_loss_equals_hand_computed_values():
    """ρ = e^{new - old}: inside the clip, above 1+ε with A > 0 (clipped), below 1-ε with A < 0
    (clipped), above 1+ε with A < 0 (not clipped: the max keeps the larger loss)."""
    old = torch.zeros(1, 4, dtype=F64)
    ratios = torch.tensor([1.1, 1.5, 0.5, 1.5], dtype=F64)
    new = ratios.log()[None].clone().requires_grad_()
    adv = torch.tensor([[2.0, 1.0, -1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    losses, metrics = pg.clipped_policy_loss(new, old, adv, mask, clip=0.2)
    torch.testing.assert_close(losses, torch.tensor([[-2.2, -1.2, 0.8, 1.5]], dtype=F64))
    losses.sum().backward()
    # d/dlogπ of -A·ρ is -A·ρ where the unclipped term is active, 0 where the clipped one is
    torch.testing.assert_close(new.grad, torch.tensor([[-2.2, 0.0, 0.0, 1.5]], dtype=F64))
    assert metrics["policy/clipfrac"].item() == pytest.approx(0.5)
    assert metrics["val/ratio"].item() == pytest.approx(ratios.mean().item())


def test_clipped_value_loss_equals_hand_computed_values():
    values = torch.tensor([[1.0, 0.0, 0.5]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]], dtype=F64)
    returns = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    losses, metrics = pg.clipped_value_loss(values, old, returns, mask, clip_value=0.2)
    # token 0: V = 1 (clipped 0.7): max(1², 0.7²)/2 = 0.5; token 1: V = 0 (clipped 0.3): max(1, 0.49)/2 = 0.5
    torch.testing.assert_close(losses, torch.tensor([[0.5, 0.5, 0.0]], dtype=F64))
    values2 = torch.tensor([[0.6, 0.4]], dtype=F64)
    l2, m2 = pg.clipped_value_loss(values2, old[:, :2], torch.tensor([[2.0, -2.0]], dtype=F64), mask[:, :2], clip_value=0.05)
    # clipped values 0.55, 0.45 are further from the returns: ½(2 - 0.55)², ½(-2 - 0.45)²
    torch.testing.assert_close(l2, torch.tensor([[0.5 * 1.45 ** 2, 0.5 * 2.45 ** 2]], dtype=F64))
    assert m2["val/clipfrac"].item() == 1.0


def test_rloo_advantages_equal_hand_computed_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 4.0, 4.0, 4.0], [1.0, 3.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    adv = pg.rloo_advantages(rewards, mask)
    want = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3],  # r_i - mean of the other three
                         [0.0, 0.0, 0.0, 0.0],  # all equal: a zero-advantage group
                         [1 - 3.0, 3 - 1.0, 0.0, 0.0]], dtype=F64)  # two valid: each minus the other
    torch.testing.assert_close(adv, want)


def test_grpo_advantages_equal_hand_computed_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 0.0, 3.0]], dtype=F64)
    none = pg.grpo_advantages(rewards, scale_rewards="none")
    torch.testing.assert_close(none, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -1.0, 2.0]], dtype=F64))
    group = pg.grpo_advantages(rewards, scale_rewards="group")
    s0, s2 = 1.0, math.sqrt((1 + 1 + 4) / 2)  # sample stds (Bessel): [1, 2, 3] -> 1; [0, 0, 3] -> sqrt(3)
    torch.testing.assert_close(group, torch.tensor([[-1 / (s0 + 1e-4), 0.0, 1 / (s0 + 1e-4)], [0.0, 0.0, 0.0],
                                                    [-1 / (s2 + 1e-4), -1 / (s2 + 1e-4), 2 / (s2 + 1e-4)]], dtype=F64))
    batch = pg.grpo_advantages(rewards, scale_rewards="batch")
    sb = rewards.flatten().std().item()  # one std of all nine rewards
    torch.testing.assert_close(batch, none / (sb + 1e-4))
    with pytest.raises(ValueError, match="scale_rewards"):
        pg.grpo_advantages(rewards, scale_rewards="max")


def test_masked_whiten_and_k3():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    w = pg.masked_whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    want = (vals - 2.5) / (vals.var() + 1e-8).sqrt()  # sample variance, as TRL's masked_var
    torch.testing.assert_close(w[mask], want)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(pg.masked_whiten(x, mask, shift_mean=False)[mask], want + 2.5)
    new, ref = torch.tensor([[-1.0, -2.0]], dtype=F64), torch.tensor([[-1.5, -1.0]], dtype=F64)
    k3 = pg.k3_kl(new, ref, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(k3, torch.tensor([[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1]], dtype=F64))


def test_prepared_targets_equal_hand_computed_values():
    """RLOO puts β·KL(y) into the reward before the leave-one-out baseline; GRPO does not; iterative
    VCB measures Δπ against π_sft or against the sampling policy."""
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    old = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-1.0, -1.0], [-0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]])
    scores = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # (P=2, n=2)
    rollout = {"scores": scores, "old_logps": old, "ref_logps": ref, "mask": mask}
    fields, metrics = pg.rloo_prepare(rollout, kl_coef=0.5)
    # KL(y) = [0.5, -1.0, 0.0, 1.0]; reward = score - 0.5·KL = [0.75, 1.5, 0.0, 1.5]
    adv = torch.tensor([0.75 - 1.5, 1.5 - 0.75, 0.0 - 1.5, 1.5 - 0.0])
    torch.testing.assert_close(fields["advantages"], torch.where(mask, adv[:, None], 0.0))
    assert metrics["objective/kl"].item() == pytest.approx(0.125)
    fields, metrics = pg.grpo_prepare(rollout, scale_rewards="none")
    torch.testing.assert_close(fields["advantages"][:, 0], torch.tensor([0.0, 0.0, -1.0, 1.0]))  # group 0 equal: 0
    assert metrics["round/zero_advantage_groups"].item() == 0.5
    anchored, _ = pg.vcb_online_prepare(rollout, reference="sft")
    rebel, _ = pg.vcb_online_prepare(rollout, reference="previous")
    torch.testing.assert_close(anchored["ref_seq"], torch.tensor([[-2.5, -1.0], [-2.0, -2.0]]))
    torch.testing.assert_close(rebel["ref_seq"], torch.tensor([[-2.0, -2.0], [-2.0, -1.0]]))


def test_non_finite_rewards_are_an_error_naming_the_prompts():
    with pytest.raises(ValueError, match=r"ppo, round 3: 1 non-finite reward\(s\) \(first prompts \['b'\]\)"):
        pg.check_finite_rewards(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]), "ppo, round 3", ["a", "b"])
    pg.check_finite_rewards(torch.tensor([[1.0, 2.0]]), "fine", ["a"])


# --------------------------------------------------------------------------------------------
# The registry, the config, the artefact keys
# --------------------------------------------------------------------------------------------


def test_online_methods_are_methods_with_their_own_keys():
    from vcb_lib.config import methods
    from vcb_lib.stages import artefacts

    assert {m.value for m in OnlineMethod} <= set(methods()) and set(methods()[:11]) >= {"vcb", "dpo", "odpo"}
    cfg = load_params(None)
    keys = {m: artefacts.method_key(cfg, m) for m in ("vcb", "ppo", "rloo", "grpo", "vcb_online")}
    for m in OnlineMethod:
        online = {k.split(".")[-1] for k in keys[m] if k.startswith("training.online.")}
        assert online == set(m.online_keys), m
        assert not {"training.max_steps", "training.epochs", "training.save_every"} & set(keys[m])
    assert not any(k.startswith("training.online") for k in keys["vcb"])  # online settings never retrain D_t methods
    assert {"training.gamma", "training.lam"} <= set(keys["vcb_online"]) and "training.gamma" not in keys["ppo"]
    grpo_batch = load_params(None, {"training.online.scale_rewards": "batch"})
    assert artefacts.method_key(grpo_batch, "ppo") == keys["ppo"] and artefacts.method_key(grpo_batch, "grpo") != keys["grpo"]
    assert artefacts.method_key(load_params(None, {"training.online.rounds": 9}), "vcb") == keys["vcb"]
    assert artefacts.method_dir_name(cfg, "ppo") == "ppo-kl0.05-seed0"
    assert artefacts.method_dir_name(grpo_batch, "grpo") == "grpo-kl0.05-scalebatch-seed0"
    assert artefacts.method_dir_name(cfg, "vcb_online") == "vcb_online-gamma0.05-lam1.0-logsumexp-seed0"
    rebel = load_params(None, {"training.online.reference": "previous"})
    assert artefacts.method_dir_name(rebel, "vcb_online").endswith("-refprevious-seed0")


def test_the_online_section_is_typed_and_checked():
    cfg = load_params(SMOKE, ["training.online.kl_coef=0.2", "training.online.scale_rewards=batch"])
    assert (cfg.training.online.kl_coef, cfg.training.online.scale_rewards, cfg.training.online.rounds) == (0.2, "batch", 2)
    assert load_params(None, {"training.online": {"rounds": 3}}).training.online.rounds == 3
    bad = {"training.online.roundz=3": r"unknown key 'training.online.roundz'. Did you mean 'training.online.rounds'\?",
           "training.online.clip=0": r"training.online.clip: must be in \(0, 10\]",
           "training.online.gae_lambda=1.5": r"training.online.gae_lambda: must be in \[0, 1\]",
           "training.online.scale_rewards=max": r"training.online.scale_rewards: expected one of 'group', 'batch', 'none'",
           "training.online=3": r"training.online: expected a mapping of OnlineConfig keys",
           "training.online.minibatches=99": r"minibatches: must be in 1..prompts_per_round"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_params(None, [override])
    with pytest.raises(ConfigError, match=r"training.online.n: \['grpo'\] compare a prompt's samples"):
        load_params(None, ["training.methods=[grpo]", "training.online.n=1"])
    load_params(None, ["training.methods=[ppo]", "training.online.n=1"])  # PPO needs no group
    from vcb_lib.config import describe

    assert "    scale_rewards: \"batch\"  # grpo:" in describe(cfg)


def test_round_prompts_cycle_through_every_prompt_once_per_pass():
    from vcb_lib.stages.online import round_prompts, round_seed

    prompts = [{"prompt_id": str(i)} for i in range(5)]
    seq = [p["prompt_id"] for r in range(1, 6) for p in round_prompts(prompts, r, 2, seed=3)]
    assert sorted(seq[:5]) == sorted(seq[5:10]) == [str(i) for i in range(5)]
    assert seq == [p["prompt_id"] for r in range(1, 6) for p in round_prompts(prompts, r, 2, seed=3)]
    assert seq != [p["prompt_id"] for r in range(1, 6) for p in round_prompts(prompts, r, 2, seed=4)]
    assert len({round_seed(0, r) for r in range(1, 50)}) == 49


# --------------------------------------------------------------------------------------------
# The trainer on a tiny model
# --------------------------------------------------------------------------------------------


def tiny():
    from vcb_lib.models import load_policy

    return load_policy("tiny-random")


def make_trainer(tok, *, value: bool, policy=None, **over):
    from vcb_lib.config import TrainingConfig
    from vcb_lib.onpolicy import OnPolicyTrainer

    cfg = TrainingConfig(**{"learning_rate": 1e-3, "warmup_steps": 0, "batch_size": 1, "max_grad_norm": 1e6,
                            "log_with": "none", **over})
    return OnPolicyTrainer(policy if policy is not None else tiny(), tok, cfg, total_steps=4,
                           value_backbone=tiny().get_decoder() if value else None)


ROWS = [([1, 2, 3, 4], [10, 20, 30]), ([1, 2, 3, 4], [11, 2]), ([1, 7, 8], [40, 41, 42, 43]), ([1, 7, 8], [5])]


def hand_rollout(trainer, ref_module, scores, n=2, temperature=1.0):
    """Two prompts × two hand-made responses of different lengths, scored by the trainer."""
    prompt_ids, response_ids = [p for p, _ in ROWS], [r for _, r in ROWS]
    old, values = trainer.score(prompt_ids, response_ids, temperature=temperature)
    ref, _ = trainer.score(prompt_ids, response_ids, temperature=temperature, model=ref_module)
    mask = torch.zeros_like(old, dtype=torch.bool)
    for j, r in enumerate(response_ids):
        mask[j, :len(r)] = True
    tensors = {"scores": torch.tensor(scores, dtype=torch.float32).view(-1, n), "old_logps": old, "ref_logps": ref,
               "mask": mask}
    if values is not None:
        tensors["old_values"] = values
    return prompt_ids, response_ids, tensors


def independent_logps(module, prompt, response, temperature=1.0):
    """Per-token log π and values of ONE row, unpadded, written out plainly."""
    ids = torch.tensor([prompt + response])
    logits = module.policy(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature  # (L, V)
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0]
    values = None
    if module.value_backbone is not None:
        h = module.value_backbone(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1]
        values = (h @ module.value_head.weight[0] + module.value_head.bias[0]).float()
    return lp, values


def test_rollout_scores_equal_unpadded_forward_passes(tok):
    """Left-padded prompts, right-padded responses: the same per-token log-probs and values as each
    row alone; at temperature 0.7 the logits are divided before the log-softmax."""
    from vcb_lib.onpolicy import PolicyAndValue

    trainer = make_trainer(tok, value=True)
    for temperature in (1.0, 0.7):
        lp, values = trainer.score([p for p, _ in ROWS], [r for _, r in ROWS], temperature=temperature)
        for j, (p, r) in enumerate(ROWS):
            want_lp, want_v = independent_logps(trainer.module, p, r, temperature)
            torch.testing.assert_close(lp[j, :len(r)], want_lp.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[j, :len(r)], want_v.detach(), rtol=1e-5, atol=1e-5)
            assert (lp[j, len(r):] == 0).all() and (values[j, len(r):] == 0).all()
    ref = PolicyAndValue(tiny())
    same, _ = trainer.score([p for p, _ in ROWS], [r for _, r in ROWS], temperature=1.0, model=ref)
    torch.testing.assert_close(same, trainer.score([p for p, _ in ROWS], [r for _, r in ROWS], temperature=1.0)[0])


def update_once(trainer, method: OnlineMethod, prompt_ids, response_ids, tensors, fields, hparams, temperature=1.0):
    """One optimizer step on the whole round; returns its log row and the gradients it stepped with."""
    grads, rows = {}, []
    step = trainer.optimizer.step

    def capture(*a, **k):
        for name, p in trainer.module.named_parameters():
            grads[name] = p.grad.detach().clone()
        return step(*a, **k)

    trainer.optimizer.step = capture
    per_row = {k: tensors[k] for k in ("mask", "old_logps", "ref_logps", "old_values") if k in tensors}
    rollout = {"prompt_ids": prompt_ids, "response_ids": response_ids, "n": 2,
               "rows": per_row | (fields if method.per_token else {}), "groups": {} if method.per_token else fields}
    trainer.update(rollout, method.objective, hparams, per_token=method.per_token, temperature=temperature, epochs=1,
                   minibatches=1, order_key="t", on_step=rows.append)
    trainer.optimizer.step = step
    return rows[0], grads


def test_one_ppo_update_equals_an_independent_computation(tok):
    """PPO on two prompts × two responses, one micro-batch per prompt (batch_size 1, so the step
    accumulates two): the logged loss and every gradient equal the same losses written out here,
    row by row without padding (own GAE loop, own whitening, clipped objective, clipped value loss,
    token-mean over the minibatch)."""
    from vcb_lib.onpolicy import PolicyAndValue

    trainer = make_trainer(tok, value=True)
    ref = PolicyAndValue(tiny())
    with torch.no_grad():  # π ≠ π_sft, so the KL penalty is not zero
        for p in trainer.module.policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    initial = copy.deepcopy(trainer.module)
    scores = [1.0, -0.5, 0.25, 2.0]
    o = dict(kl_coef=0.1, gae_gamma=1.0, gae_lambda=0.95, whiten_rewards=True)
    prompt_ids, response_ids, tensors = hand_rollout(trainer, ref, scores)
    # as if an older policy had sampled: ratios e^{±0.3} and values ±0.5 off, beyond both clips
    L = tensors["mask"].shape[1]
    shift = torch.tensor([0.3 * (-1) ** t for t in range(L)])
    tensors["old_logps"] = torch.where(tensors["mask"], tensors["old_logps"] + shift, 0.0)
    tensors["old_values"] = torch.where(tensors["mask"], tensors["old_values"] - 5 / 3 * shift, 0.0)
    fields, _ = pg.ppo_prepare(tensors, **o)
    hparams = dict(clip=0.2, clip_value=0.2, vf_coef=0.1)
    row, grads = update_once(trainer, OnlineMethod.PPO, prompt_ids, response_ids, tensors, fields, hparams)

    # ---- the same, independently: per row, unpadded, plain Python loops over tokens
    olds, refs, vals = [], [], []
    with torch.no_grad():
        for p, r in ROWS:
            lp, v = independent_logps(initial, p, r)
            olds.append(lp.double() + shift[:len(r)].double())
            vals.append(v.double() - 5 / 3 * shift[:len(r)].double())
            refs.append(independent_logps(ref, p, r)[0].double())
    token_rewards = []
    for j, (p, r) in enumerate(ROWS):
        rw = [-o["kl_coef"] * (olds[j][t] - refs[j][t]).item() for t in range(len(r))]
        rw[-1] += scores[j]
        token_rewards.append(rw)
    flat = [x for rw in token_rewards for x in rw]  # whiten_rewards: sample std, mean kept
    mean, std = np.mean(flat), np.std(flat, ddof=1)
    token_rewards = [[(x - mean) / math.sqrt(std ** 2 + 1e-8) + mean for x in rw] for rw in token_rewards]
    advs, rets = [], []
    for j, rw in enumerate(token_rewards):
        v = vals[j].tolist() + [0.0]
        a, last = [0.0] * len(rw), 0.0
        for t in reversed(range(len(rw))):
            last = rw[t] + o["gae_gamma"] * v[t + 1] - v[t] + o["gae_gamma"] * o["gae_lambda"] * last
            a[t] = last
        advs.append(a)
        rets.append([a[t] + v[t] for t in range(len(rw))])
    flat = [x for a in advs for x in a]
    mean, std = np.mean(flat), np.std(flat, ddof=1)
    advs = [[(x - mean) / math.sqrt(std ** 2 + 1e-8) for x in a] for a in advs]
    total, count = 0.0, sum(len(r) for _, r in ROWS)
    for j, (p, r) in enumerate(ROWS):
        lp, v = independent_logps(initial, p, r)
        for t in range(len(r)):
            ratio = torch.exp(lp[t] - olds[j][t].float())
            adv = advs[j][t]
            pg_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
            v_clip = vals[j][t].float() + (v[t] - vals[j][t].float()).clamp(-0.2, 0.2)
            vf_loss = 0.5 * torch.maximum((v[t] - rets[j][t]) ** 2, (v_clip - rets[j][t]) ** 2)
            total = total + (pg_loss + 0.1 * vf_loss) / count
    total.backward()
    assert row["loss"] == pytest.approx(total.item(), rel=1e-4, abs=1e-6)
    assert 0 < row["policy/clipfrac"] < 1 and 0 < row["val/clipfrac"] < 1  # both clips are active somewhere
    want = {name: p.grad for name, p in initial.named_parameters()}
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in want.values())).item()
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 0.1
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=2e-6, msg=name)
    torch.testing.assert_close(fields["returns"][0, :3].double(), torch.tensor(rets[0], dtype=F64), rtol=1e-4, atol=1e-5)


def perturbed(scale=0.05):
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + p.numel())))
    return model


def test_kl_coefficient_zero_vs_positive(tok):
    """At π = π_sft the per-token KL penalty is exactly 0: PPO's update does not depend on β. Away
    from π_sft, β > 0 changes it; with equal rewards GRPO does not move at β = 0 (a zero-advantage
    round) and at β > 0 moves towards π_sft (its k3 KL on the round's tokens goes down)."""
    from vcb_lib.onpolicy import PolicyAndValue

    scores = [1.0, -0.5, 0.25, 2.0]
    runs = {}
    for start in ("sft", "away"):
        for kl in (0.0, 0.5):
            trainer = make_trainer(tok, value=True, policy=tiny() if start == "sft" else perturbed())
            prompt_ids, response_ids, tensors = hand_rollout(trainer, PolicyAndValue(tiny()), scores)
            fields, _ = pg.ppo_prepare(tensors, kl_coef=kl, gae_gamma=1.0, gae_lambda=0.95, whiten_rewards=False)
            runs[start, kl] = update_once(trainer, OnlineMethod.PPO, prompt_ids, response_ids, tensors, fields,
                                          dict(clip=0.2, clip_value=0.2, vf_coef=0.1))[1]
    same = runs["sft", 0.0], runs["sft", 0.5]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    away = runs["away", 0.0], runs["away", 0.5]
    assert max((away[0][k] - away[1][k]).abs().max().item() for k in away[0]) > 1e-4

    moved = {}
    for beta in (0.0, 0.5):
        trainer = make_trainer(tok, value=False, policy=perturbed(), learning_rate=3e-3)
        ref = PolicyAndValue(tiny())
        prompt_ids, response_ids, tensors = hand_rollout(trainer, ref, [0.3] * 4)  # every reward equal
        fields, metrics = pg.grpo_prepare(tensors, scale_rewards="group")
        assert metrics["round/zero_advantage_groups"].item() == 1.0 and (fields["advantages"] == 0).all()
        before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        update_once(trainer, OnlineMethod.GRPO, prompt_ids, response_ids, tensors, fields, dict(clip=0.2, kl_coef=beta))
        after = trainer.module.state_dict()
        moved[beta] = max((after[k] - before[k]).abs().max().item() for k in before)
        new, _ = trainer.score(prompt_ids, response_ids, temperature=1.0)
        k3 = lambda lp: pg.masked_mean(pg.k3_kl(lp, tensors["ref_logps"], tensors["mask"]), tensors["mask"]).item()  # noqa: E731
        if beta:
            assert k3(new) < k3(tensors["old_logps"])  # pulled towards π_sft
    assert moved[0.0] == 0.0 and moved[0.5] > 1e-4


def test_loss_aggregation_entropy_and_critic_warmup_in_the_trainer(tok):
    """One GRPO step, one micro-batch per prompt: its logged loss is Σ w·l / Σ units of the whole
    minibatch (each aggregation, by hand from an unsplit computation of the per-token losses); the
    entropy bonus subtracts coef × the token-mean entropy, which equals -Σ p·log p of plain
    forward passes; a critic-only PPO step leaves every policy weight (and its optimizer state)
    untouched and moves the value network."""
    from vcb_lib.onpolicy import PolicyAndValue, collate_rollouts, token_logps_and_values

    ref = PolicyAndValue(tiny())
    hp = dict(clip=0.2, kl_coef=0.5)
    losses = {}
    for aggregation in pg.LOSS_AGGREGATIONS:
        trainer = make_trainer(tok, value=False, policy=perturbed())
        prompt_ids, response_ids, tensors = hand_rollout(trainer, ref, [1.0, -0.5, 0.25, 2.0])
        fields, _ = pg.grpo_prepare(tensors, scale_rewards="group")
        w, units = pg.aggregation_weights(tensors["mask"], aggregation, max_tokens=5)
        per_token, _ = pg.grpo_objective(tensors["old_logps"], None, tensors | fields, **hp)  # step 1: π_new = π_old
        want = ((per_token.double() * w.double()).sum() / units.double().sum()).item()
        row, _ = update_once(trainer, OnlineMethod.GRPO, prompt_ids, response_ids, tensors,
                             fields | {"loss_weights": w, "loss_units": units}, hp)
        assert row["loss"] == pytest.approx(want, rel=1e-4, abs=1e-7), aggregation
        losses[aggregation] = row["loss"]
    assert len(set(losses.values())) == 3

    trainer = make_trainer(tok, value=False, policy=perturbed())
    batch = collate_rollouts([p for p, _ in ROWS], [r for _, r in ROWS], 0)
    with torch.no_grad():
        _, _, entropy = token_logps_and_values(trainer.module, batch, with_entropy=True)
        for j, (p, r) in enumerate(ROWS):
            logits = trainer.module.policy(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1].double()
            probs = torch.softmax(logits, -1)
            torch.testing.assert_close(entropy[j, :len(r)].double(), -(probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-5)
            assert (entropy[j, len(r):] == 0).all()
    rows = {}
    for coef in (0.0, 0.1):
        trainer = make_trainer(tok, value=False, policy=perturbed())
        prompt_ids, response_ids, tensors = hand_rollout(trainer, ref, [1.0, -0.5, 0.25, 2.0])
        fields, _ = pg.grpo_prepare(tensors, scale_rewards="group")
        rollout = {"prompt_ids": prompt_ids, "response_ids": response_ids, "n": 2, "groups": {},
                   "rows": {k: tensors[k] for k in ("mask", "old_logps", "ref_logps")} | fields}
        out = []
        trainer.update(rollout, OnlineMethod.GRPO.objective, hp | {"entropy_coef": coef}, per_token=True, temperature=1.0,
                       epochs=1, minibatches=1, order_key="t", on_step=out.append, entropy=coef > 0)
        rows[coef] = out[0]
    mean_entropy = pg.masked_mean(entropy, batch["response_mask"]).item()
    assert rows[0.1]["policy/entropy"] == pytest.approx(mean_entropy, rel=1e-4)
    assert rows[0.1]["loss"] == pytest.approx(rows[0.0]["loss"] - 0.1 * mean_entropy, rel=1e-4)

    trainer = make_trainer(tok, value=True, policy=perturbed())
    prompt_ids, response_ids, tensors = hand_rollout(trainer, ref, [1.0, -0.5, 0.25, 2.0])
    fields, _ = pg.ppo_prepare(tensors, kl_coef=0.1, gae_gamma=1.0, gae_lambda=0.95, whiten_rewards=False)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    rollout = {"prompt_ids": prompt_ids, "response_ids": response_ids, "n": 2, "groups": {},
               "rows": {k: tensors[k] for k in ("mask", "old_logps", "ref_logps", "old_values")} | fields}
    trainer.update(rollout, OnlineMethod.PPO.objective, dict(clip=0.2, clip_value=0.2, vf_coef=0.1, critic_only=True),
                   per_token=True, temperature=1.0, epochs=1, minibatches=1, order_key="t", train_policy=False)
    after = trainer.module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("policy."))
    assert max((after[k] - before[k]).abs().max().item() for k in before if k.startswith("value_")) > 1e-5
    assert not any(trainer.optimizer.state.get(p) for p in trainer.module.policy.parameters())


# --------------------------------------------------------------------------------------------
# The rollout loop
# --------------------------------------------------------------------------------------------

LOOP = ["models.sft=false", "training.learning_rate=1e-3", "training.warmup_steps=0", "training.log_with=none",
        "evaluation.curve_points=0", "sampling.batch_size=2", "training.batch_size=1", "training.online.prompts_per_round=3",
        "training.online.n=2", "training.online.epochs=2", "training.online.minibatches=2", "sampling.max_new_tokens=6"]


def loop_cfg(*over):
    return load_params(SMOKE, LOOP + list(over))


def final_weights(out):
    return load_file(out / "final" / "model.safetensors")


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


class Characters:
    """A reward that varies on the tiny model's random text (VADER scores most of it 0): its length."""

    def score(self, prompts, responses):
        return np.array([len(r) / 10 for r in responses])


def test_a_run_killed_between_rounds_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """PPO, 3 rounds. Killed after round 1 is sealed, then killed in round 3 after its update but
    before its seal: each rerun resumes after the newest sealed round (dropping the unsealed
    round's log rows) and ends with the uninterrupted run's weights and log, bit for bit."""
    from vcb_lib.stages import online

    monkeypatch.setattr(online, "load_reward", lambda spec, task: Characters())
    cfg = loop_cfg("training.online.rounds=3")
    full = online.run_rounds(cfg, "ppo", tmp_path / "full", log=lambda m: None)
    assert full["steps"] == 3 * 2 * 2 and full["policy_samples"] == 3 * 3 * 2 and full["tokens_trained"] > 0

    out = tmp_path / "cut"

    def kill_after(r):
        if r == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        online.run_rounds(cfg, "ppo", out, on_round=kill_after, log=lambda m: None)
    assert online.latest_round(out, _key(cfg), 3) == 1 and not (out / "final").exists()
    seal = online._seal_round

    def dies_before_sealing(cfg_, om, trainer, out_, key, r, *a):
        if r == 3:
            raise KeyboardInterrupt
        return seal(cfg_, om, trainer, out_, key, r, *a)

    torch.manual_seed(999)  # another global RNG state: nothing in a round may read it
    messages = []
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(online, "_seal_round", dies_before_sealing)
        online.run_rounds(cfg, "ppo", out, log=messages.append)
    assert messages == ["ppo: resuming after round 1 of 3", "sampler: hf"]
    assert max(json.loads(x)["round"] for x in (out / "log.jsonl").read_text().splitlines()) == 3  # unsealed rows
    online.run_rounds(cfg, "ppo", out, log=lambda m: None)
    assert max_diff(final_weights(out), final_weights(tmp_path / "full")) == 0.0
    cut_log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut_log] == list(range(1, 13))
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log]
    assert sorted(p.name for p in (out / "rounds").iterdir() if p.is_dir()) == ["round-0002", "round-0003"]
    assert len(list((out / "rollouts").glob("*.parquet"))) == 3
    assert max_diff(final_weights(out), load_file(_tiny_file(tmp_path))) > 1e-3  # it trained


def test_a_damaged_newest_round_is_set_aside_for_the_previous_intact_one(tmp_path, monkeypatch):
    """A round's state is a checkpoint in the offline trainer's format (vcb_lib.checkpoints:
    trainer_state.json, then checksums.json listing the state files). The newest sealed round
    damaged (a byte of its optimizer state flipped): the rerun warns naming it and the problem, sets
    it aside as damaged-round-0003, resumes after round 2 and ends with the uninterrupted run's
    weights and log."""
    from vcb_lib.checkpoints import CheckpointWarning
    from vcb_lib.onpolicy import verify_state
    from vcb_lib.stages import online

    monkeypatch.setattr(online, "load_reward", lambda spec, task: Characters())
    cfg = loop_cfg("training.online.rounds=3")
    online.run_rounds(cfg, "grpo", tmp_path / "full", log=lambda m: None)
    out = tmp_path / "cut"

    def kill_after(r):
        if r == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        online.run_rounds(cfg, "grpo", out, on_round=kill_after, log=lambda m: None)
    folder = out / "rounds" / "round-0003"
    listed = json.loads((folder / "checksums.json").read_text())["files"]
    assert sorted(listed) == ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["format"], state["round"], state["step"], state["method"]) == (1, 3, 12, "grpo")
    assert verify_state(folder) is None
    data = bytearray((folder / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "optimizer.pt").write_bytes(bytes(data))
    assert verify_state(folder) == "optimizer.pt does not match its sha256"

    messages = []
    with pytest.warns(CheckpointWarning, match="round-0003 is damaged: optimizer.pt does not match its sha256; "
                                               "skipped \\(moved to damaged-round-0003\\)"):
        online.run_rounds(cfg, "grpo", out, log=messages.append)
    assert messages[0] == "grpo: resuming after round 2 of 3"
    assert max_diff(final_weights(out), final_weights(tmp_path / "full")) == 0.0
    cut_log, full_log = ([json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for d in (out, tmp_path / "full"))
    assert [r["step"] for r in cut_log] == list(range(1, 13)) and [r["loss"] for r in cut_log] == [r["loss"] for r in full_log]
    assert sorted(p.name for p in (out / "rounds").iterdir() if p.is_dir()) == ["damaged-round-0003", "round-0002", "round-0003"]
    assert verify_state(out / "rounds" / "round-0003") is None


def _key(cfg):
    from vcb_lib.stages import artefacts

    return artefacts.method_key(cfg, "ppo", cfg.run.seed)


def _tiny_file(tmp_path):
    from safetensors.torch import save_model

    path = tmp_path / "tiny.safetensors"
    save_model(tiny(), str(path))
    return path


class Constant:
    """A reward model giving every response the same value (or NaN)."""

    def __init__(self, value):
        self.value = value

    def score(self, prompts, responses):
        return np.full(len(responses), self.value)


def test_nan_rewards_stop_and_equal_rewards_give_a_zero_advantage_round(tmp_path, monkeypatch):
    from vcb_lib.stages import online

    cfg = loop_cfg("training.online.rounds=1", "training.online.kl_coef=0.0")
    monkeypatch.setattr(online, "load_reward", lambda spec, task: Constant(float("nan")))
    with pytest.raises(ValueError, match=r"grpo, round 1: 6 non-finite reward\(s\) \(first prompts \['sentiment-"):
        online.run_rounds(cfg, "grpo", tmp_path / "nan", log=lambda m: None)
    assert not (tmp_path / "nan" / "rounds").exists() or not list((tmp_path / "nan" / "rounds").iterdir())
    monkeypatch.setattr(online, "load_reward", lambda spec, task: Constant(0.7))
    for method in ("grpo", "rloo"):
        online.run_rounds(cfg, method, tmp_path / method, log=lambda m: None)
        rows = [json.loads(x) for x in (tmp_path / method / "log.jsonl").read_text().splitlines()]
        assert all(r["round/zero_advantage_groups"] == 1.0 and r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)
        assert max_diff(final_weights(tmp_path / method), load_file(_tiny_file(tmp_path))) == 0.0
        table = pd.read_parquet(tmp_path / method / "rollouts" / "round-0001.parquet")
        assert (table.advantage == 0).all() and np.isfinite(table[["score", "old_logp", "ref_logp"]].to_numpy()).all()


def test_iterative_vcb_anchored_and_rebel_style(tmp_path, monkeypatch):
    """Round 1 samples from π_sft, so both references are π_sft there and the runs agree; in round
    2 the anchored run measures Δπ against π_sft's log-probs, the REBEL-style one against the
    policy that sampled the round (round 1's result), and the runs part."""
    from vcb_lib.stages import online

    monkeypatch.setattr(online, "load_reward", lambda spec, task: Characters())
    runs = {}
    for reference in ("sft", "previous"):
        cfg = loop_cfg("training.online.rounds=2", f"training.online.reference={reference}", "training.gamma=0.5")
        out = tmp_path / reference
        online.run_rounds(cfg, "vcb_online", out, log=lambda m: None)
        runs[reference] = [pd.read_parquet(out / "rollouts" / f"round-000{r}.parquet") for r in (1, 2)], final_weights(out)
    (sft1, sft2), w_sft = runs["sft"]
    (prev1, prev2), w_prev = runs["previous"]
    pd.testing.assert_frame_equal(sft1, prev1)
    np.testing.assert_allclose(sft1.vcb_ref_logp, sft1.ref_logp, rtol=1e-6)  # round 1: the sampler is π_sft
    np.testing.assert_allclose(sft1.old_logp, sft1.ref_logp, rtol=1e-6)
    np.testing.assert_allclose(sft2.vcb_ref_logp, sft2.ref_logp, rtol=1e-6)  # anchored
    np.testing.assert_allclose(prev2.vcb_ref_logp, prev2.old_logp, rtol=1e-6)  # REBEL-style: π_t
    assert np.abs(prev2.old_logp - prev2.ref_logp).max() > 1e-3  # π_t ≠ π_sft after a round
    assert max_diff(w_sft, w_prev) > 1e-5
    np.testing.assert_allclose(sft1.old_logp, sft1.sampler_logp, rtol=1e-5)  # the update's log-probs = the sampler's


def test_the_peers_options_in_the_rollout_loop(tmp_path, monkeypatch):
    """PPO with every option on, two rounds, the first a critic warm-up: round 1 leaves the policy at
    π_sft and trains the value network, round 2 trains the policy; the entropy is logged. RLOO at its
    defaults (one ratio per sequence) with Dr. GRPO's constant aggregation trains."""
    from vcb_lib.onpolicy import PolicyAndValue
    from vcb_lib.stages import online

    monkeypatch.setattr(online, "load_reward", lambda spec, task: Characters())
    opts = ["training.online.kl_estimator=k3", "training.online.loss_aggregation=sequence_mean",
            "training.online.clip_high=0.28", "training.online.dual_clip=3", "training.online.reward_clip=0.5",
            "training.online.entropy_coef=0.01"]
    cfg = loop_cfg("training.online.rounds=2", "training.online.critic_warmup_rounds=1", *opts)
    out = tmp_path / "ppo"
    states = {}
    online.run_rounds(cfg, "ppo", out, on_round=lambda r: states.__setitem__(r, load_file(out / "rounds" / f"round-000{r}" / "model.safetensors")),
                      log=lambda m: None)
    sft = load_file(_tiny_file(tmp_path))
    policy = lambda state: {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}  # noqa: E731
    assert max_diff(policy(states[1]), sft) == 0.0 and max_diff(policy(states[2]), sft) > 1e-4
    value = lambda state: {k: v for k, v in state.items() if k.startswith("value_")}  # noqa: E731
    start = PolicyAndValue(tiny(), tiny().get_decoder()).state_dict()  # the value network before round 1 (seeded head)
    assert max_diff(value(states[1]), value(start)) > 1e-5  # the warm-up trained it
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all("policy/entropy" in row and "policy/dual_clipfrac" in row for row in log)
    table = pd.read_parquet(out / "rollouts" / "round-0001.parquet")
    assert table.score.abs().max() > 0.5  # the raw scores are kept; the advantages saw them clipped

    cfg = loop_cfg("training.online.rounds=1", "training.online.loss_aggregation=constant")
    assert cfg.training.online.clip_level == "sequence"
    online.run_rounds(cfg, "rloo", tmp_path / "rloo", log=lambda m: None)
    log = [json.loads(x) for x in (tmp_path / "rloo" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) and 0 <= row["policy/clipfrac"] <= 1 for row in log)
    assert max_diff(final_weights(tmp_path / "rloo"), sft) > 1e-4


def test_an_online_method_trains_through_stage_03(tmp_path):
    """train_method launches the rounds like the offline trainer (accelerate launch), seals
    03_train/<method>/ with final/, log.jsonl and summary.json, and reuses it afterwards."""
    from vcb_lib.stages import artefacts, train

    cfg = load_params(SMOKE, LOOP + [f"run.output_root={tmp_path}", "training.online.rounds=1",
                                     "training.methods=[grpo]", "rewards.reward_model=gold"])
    lines = []
    summary = train.train_method(cfg, "grpo", log=lines.append)
    art = artefacts.method(cfg, "grpo")
    assert art.current() and (art.path / "final" / "model.safetensors").is_file()
    assert summary["policy_samples"] == 6 and summary["steps"] == 4 and any("grpo rounds" in x for x in lines)
    assert train.train_method(cfg, "grpo", log=lines.append) == summary and "up to date" in lines[-1]


def test_two_processes_equal_one(tmp_path):
    """A real 2-process gloo run (each process samples and scores every other chunk of prompts, and
    trains one micro-batch of each step's two) equals the one-process run: the same rollouts, the
    same weights up to fp32 summation order."""
    from vcb_lib.launch import launch_subprocess
    from vcb_lib.stages import online

    over = LOOP + ["training.online.rounds=2", "training.online.prompts_per_round=4", "training.online.minibatches=2"]
    params = load_params(SMOKE, over + ["run.device=cpu"]).save(tmp_path / "params.yaml")
    lines = []
    launch_subprocess(["-m", "vcb_lib.stages.online", "--params", str(params), "--method", "grpo", "--out",
                       str(tmp_path / "two")], num_processes=2, cpu=True, echo=lines.append)
    online.run_rounds(load_params(params), "grpo", tmp_path / "one", log=lambda m: None)
    for r in (1, 2):
        a, b = (pd.read_parquet(tmp_path / x / "rollouts" / f"round-000{r}.parquet") for x in ("two", "one"))
        assert list(a.response) == list(b.response)
        np.testing.assert_allclose(a.old_logp, b.old_logp, rtol=1e-5)
    two, one = ([json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("two", "one"))
    for x, y in zip(two, one):
        assert x["prompts"] == y["prompts"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
    assert max_diff(final_weights(tmp_path / "two"), final_weights(tmp_path / "one")) < 5e-6
    assert any('"policy_samples": 16' in line for line in lines)


VLLM_ROUNDS = r'''
import json, sys
import numpy as np
import pandas as pd
from vcb_lib.config import load_params
from vcb_lib.stages import online

class Characters:
    def score(self, prompts, responses):
        return np.array([len(r) / 10 for r in responses])

if __name__ == "__main__":
    smoke, out, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    online.load_reward = lambda spec, task: Characters()
    cfg = load_params(smoke, over)
    online.run_rounds(cfg, "rloo", out, log=print)
    tables = [pd.read_parquet(f"{out}/rollouts/round-{r:04d}.parquet") for r in (1, 2)]
    print(json.dumps({"rounds": [{k: t[k].tolist() for k in ("sampler_logp", "old_logp", "ref_logp")} for t in tables]}))
'''


@pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (make vllm)")
def test_vllm_rounds_sample_from_the_current_policy(tmp_path):
    """sampling.backend=vllm: round 2's tokens come from the policy that round 1 trained, not from
    π_sft. vLLM's log-prob of each sample equals the trainer's (old) log-prob of it, in both rounds;
    in round 2 both differ from π_sft's by far more than that agreement."""
    script = tmp_path / "rounds.py"
    script.write_text(VLLM_ROUNDS)
    over = LOOP + ["sampling.backend=vllm", "training.online.rounds=2", "training.learning_rate=3e-3"]
    proc = subprocess.run([sys.executable, str(script), str(SMOKE), str(tmp_path / "out"), json.dumps(over)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sampler: vllm" in proc.stdout
    rounds = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"rounds"')))["rounds"]
    for r in rounds:  # vLLM's CPU kernels sum in another order: 1e-2 on ~6 tokens (as test_samplers)
        np.testing.assert_allclose(r["sampler_logp"], r["old_logp"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(rounds[0]["old_logp"], rounds[0]["ref_logp"], atol=1e-5, rtol=0)  # round 1 is π_sft
    assert np.max(np.abs(np.subtract(rounds[1]["old_logp"], rounds[1]["ref_logp"]))) > 0.1  # round 2 is not
