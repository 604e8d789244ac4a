"""Verdicts that check themselves (stage 04): every policy's on-policy samples beside the pool, drawn with
common random numbers; the pool's validity per policy (its bias against the on-policy estimate, its ESS);
comparisons of a policy the pool is not valid for decided by the on-policy samples."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vcb_lib.config import PROJECT_ROOT, load_params
from vcb_lib.stages import evaluate

SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"


def test_equal_policies_draw_identical_samples_under_common_random_numbers(base, tok):
    import copy

    import torch

    from vcb_lib.samplers import HFSampler

    prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"]
    sampler = HFSampler(base, tok, batch_size=2)
    first = sampler.generate(prompts, 3, 1.0, 6, seed=1000)
    twin = copy.deepcopy(base)
    sampler.sync_weights(twin)  # a second policy equal to the first: the same text, token for token
    assert [[c.token_ids for c in cs] for cs in sampler.generate(prompts, 3, 1.0, 6, seed=1000)] == \
        [[c.token_ids for c in cs] for cs in first]
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5 * torch.randn_like(p))
    moved = sampler.generate(prompts, 3, 1.0, 6, seed=1000)
    assert [[c.token_ids for c in cs] for cs in moved] != [[c.token_ids for c in cs] for cs in first]


def _world(P=60, N=8, m=6, k=2, seed=0):
    """P prompts, each with N responses of known reward; π_sft near uniform; a near policy (π_opt at a very
    large γ) and a far one (π_opt at a small γ: almost all mass on the best response). Returns the pool
    (m candidates from π_sft per prompt), every policy's log-probs on it, and k on-policy samples each."""
    rng = np.random.default_rng(seed)
    rewards = rng.uniform(-1, 1, size=(P, N))
    sft = np.log(rng.dirichlet(np.full(N, 5.0), size=P))
    opt = lambda gamma: sft + rewards / gamma - np.logaddexp.reduce(sft + rewards / gamma, axis=1, keepdims=True)  # noqa: E731
    policies = {"sft": sft, "vcb": opt(50.0), "dpo": opt(0.02)}  # near: ESS/m above the calibrated 0.98
    ids = [f"x{i}" for i in range(P)]
    draw = lambda lp, n: np.stack([rng.choice(N, size=n, p=np.exp(row)) for row in lp])  # noqa: E731
    pick = draw(sft, m)  # (P, m)
    pool = pd.DataFrame({"prompt_id": np.repeat(ids, m), "k": np.tile(np.arange(m), P),
                         "ref_logp": np.take_along_axis(sft, pick, 1).ravel(),
                         "gold": np.take_along_axis(rewards, pick, 1).ravel()}).assign(reward=lambda d: d.gold)
    logps = {name: np.take_along_axis(lp, pick, 1).ravel() for name, lp in policies.items()}
    frames = []
    for name, lp in policies.items():
        y = draw(lp, k)
        frames.append(pd.DataFrame({"prompt_id": np.repeat(ids, k), "k": np.tile(np.arange(k), P), "method": name,
                                    "gold": np.take_along_axis(rewards, y, 1).ravel()}))
    exact = {name: float((np.exp(lp) * rewards).sum(1).mean()) for name, lp in policies.items()}
    return pool, logps, pd.concat(frames, ignore_index=True), exact


def test_a_far_policy_is_not_valid_for_the_pool_and_is_decided_on_policy():
    cfg = load_params(SMOKE, {"training.methods": ["vcb", "dpo"], "evaluation.bootstrap": 1000})
    pool, logps, samples, exact = _world()
    out = evaluate.pool_metrics(cfg, pool, logps, samples)
    v = {name: out["methods"][name]["validity"] for name in ("sft", "vcb", "dpo")}
    assert v["sft"]["valid"] and v["vcb"]["valid"], v
    assert not v["dpo"]["valid"] and "ESS below the calibrated threshold" in v["dpo"]["why_not"], v["dpo"]
    assert v["dpo"]["ess_fraction"]["mean"] < v["vcb"]["ess_fraction"]["mean"] < 1.0 == v["sft"]["ess_fraction"]["min"]
    for name in ("sft", "vcb", "dpo"):  # the on-policy estimate: its CI covers the exact value here
        lo, hi = out["methods"][name]["on_policy_ci"]
        assert lo <= exact[name] <= hi, (name, lo, hi, exact[name])
    vs_far, vs_sft = out["paired"]["vcb-vs-dpo"], out["paired"]["vcb-vs-sft"]
    assert vs_far["decided_by"] == "on-policy" and vs_sft["decided_by"] == "pool"
    assert vs_far["gold_diff"] == vs_far["on_policy"]["diff"] and vs_far["pool"]["gold_diff"] != vs_far["gold_diff"]
    on = samples.groupby(["method", "prompt_id"], sort=False).gold.mean()
    assert vs_far["on_policy"]["diff"] == pytest.approx((on["vcb"] - on["dpo"]).mean())  # paired per prompt, by hand


def test_the_bias_check_fires_when_the_pool_is_wrong():
    cfg = load_params(SMOKE, {"training.methods": ["vcb", "dpo"]})
    pool, logps, samples, _ = _world(seed=1)
    samples.loc[samples.method == "vcb", "gold"] += 0.5  # the on-policy truth moved: the pool now misses it
    v = evaluate.pool_metrics(cfg, pool, logps, samples)["methods"]["vcb"]["validity"]
    assert not v["valid"] and v["why_not"] == ["pool − on-policy CI excludes 0"] and v["bias"] == pytest.approx(-0.5, abs=0.1)
