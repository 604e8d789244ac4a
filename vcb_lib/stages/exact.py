"""Stage 04's exact part (notebook 04, the exact task): every policy's probability of every response,
and the metrics of :mod:`vcb_lib.exact` on them. :func:`vcb_lib.stages.evaluate.run` adds what
:func:`evaluate` returns as ``metrics["exact"]`` when the task is enumerable (``Task.exact``).

Policies: π_sft, each trained method (main replicate) and ``opt``, Eq. 15's optimum
π_sft·e^{r/(γσ_r(x))}/Z with σ_r(x) the exact reward std under π_sft (the value Eq. 10 estimates
from n samples). Two prompt sets: ``train`` (D_t's prompts: Eq. 12 on the candidates, the mass outside
D_t, the near-tie) and ``test`` (the sampled evaluation's prompts). The keys ``reward_kl``,
``win_rate`` and ``misalignment_rate`` repeat the test set's numbers under the names and shapes of the
sampled metrics (the reference method against each other policy), so the report, the sweeps and the
panel read an exact and a sampled run alike; every value is exact (``exact: true``, no CI).
"""
from __future__ import annotations

import numpy as np

from vcb_lib import exact
from vcb_lib.config import Config
from vcb_lib.stages import artefacts
from vcb_lib.stages.generate import read_candidates

OPT = "opt"  # π_opt of Eq. 15 among the policies


def _split_metrics(name: str, logp: np.ndarray, ref: np.ndarray, rewards: np.ndarray, opt: np.ndarray) -> dict:
    """Per policy on one prompt set: E_π[r], KL(π‖π_sft), win rate over π_sft, distance to π_opt
    (Eq. 15) and to the frontier's optimum at the same KL, misalignment over all pairs."""
    reward, kl = float(exact.expectation(logp, rewards).mean()), float(exact.kl(logp, ref).mean())
    alpha = exact.matched_alpha(ref, rewards, kl)  # None: beyond the frontier's reach, whose reward is then the maximum
    matched = None if alpha is None else exact.optimal_logps(ref, rewards, alpha) if np.isfinite(alpha) else ref
    frontier_reward = float(rewards.max(1).mean() if matched is None else exact.expectation(matched, rewards).mean())
    return {"reward": reward, "kl": kl, "win_rate_vs_sft": exact.win_rate(logp, ref, rewards)["win_rate"],
            "kl_to_opt": float(exact.kl(logp, opt).mean()), "tv_to_opt": float(exact.tv(logp, opt).mean()),
            "matched_alpha": alpha if alpha is not None and np.isfinite(alpha) else None, "frontier_reward": frontier_reward,
            "regret": frontier_reward - reward,
            "kl_to_frontier": None if matched is None else float(exact.kl(logp, matched).mean()),
            "misalignment_rate": None if name == "sft" else exact.misalignment_rate(logp, ref, rewards)}


def evaluate(cfg: Config, reference: str, *, log=print) -> dict:
    """``metrics["exact"]`` for ``cfg`` (module docstring), ``reference`` being the method the win rates
    compare with the others (stage 04's); needs π_sft, every method's final policy and D_t, all current."""
    from vcb_lib.data import task_of, task_prompts
    from vcb_lib.models import load_policy, load_tokenizer
    from vcb_lib.tasks.exact import MAX_RESPONSES, all_responses, reward_ids, target_logps, token_ids

    L, gamma = cfg.sampling.max_new_tokens, cfg.training.gamma
    specs = artefacts.policy_specs(cfg)
    tok = load_tokenizer(specs["sft"], cache_dir=cfg.models.cache_dir)
    V = len(tok)
    responses = all_responses(V, L)  # (N, L); over the cap: a ValueError naming it
    dt = read_candidates(cfg)
    prompts = {"train": list(dict.fromkeys(dt.prompt)),
               "test": [r["prompt"] for r in task_prompts(task_of(cfg), "test", cfg.evaluation.num_prompts)]}
    rewards = {s: np.stack([reward_ids(token_ids(p), responses) for p in ps]) for s, ps in prompts.items()}
    logps: dict[str, dict[str, np.ndarray]] = {s: {} for s in prompts}
    for name, spec in specs.items():
        model = load_policy(spec, dtype="float32", cache_dir=cfg.models.cache_dir)
        for s, ps in prompts.items():
            logps[s][name] = exact.policy_logps(model, tok, ps, L)
    for s in prompts:  # Eq. 15 on the whole space, σ_r exact under π_sft
        sigma = exact.reward_std(logps[s]["sft"], rewards[s])
        logps[s][OPT] = exact.optimal_logps(logps[s]["sft"], rewards[s], gamma * sigma)

    out: dict = {"exact": True, "vocabulary": list(tok.convert_ids_to_tokens(list(range(V)))), "length": L,
                 "responses_per_prompt": len(responses), "cap": MAX_RESPONSES, "gamma": gamma,
                 "prompts": {s: len(ps) for s, ps in prompts.items()}, "reference": reference,
                 "policies": [*specs, OPT]}  # π_sft, the methods in training.methods' order, π_opt
    for s in prompts:
        ref, r, opt = logps[s]["sft"], rewards[s], logps[s][OPT]
        out[s] = {name: _split_metrics(name, lp, ref, r, opt) for name, lp in logps[s].items()}
        out[s]["sft"]["fit_kl_target"] = float(np.mean(  # KL(π_target ‖ π_sft): how well SFT fitted the known target
            [exact.kl(target_logps(token_ids(p), responses)[None], ref[i:i + 1])[0] for i, p in enumerate(prompts[s])]))
        out[f"frontier_{s}"] = exact.frontier(ref, r)

    # D_t: its candidates as columns of the train table; Eq. 12 on them and on all responses; the mass outside
    train, ref, r = prompts["train"], logps["train"]["sft"], rewards["train"]
    row = {p: i for i, p in enumerate(train)}
    cand = dt.assign(_row=dt.prompt.map(row), _col=exact.response_index(list(dt.response_ids), V))
    n = int(cand.groupby("_row").size().max())
    cols, mask = np.zeros((len(train), n), dtype=np.int64), np.zeros((len(train), n), dtype=bool)
    for i, g in cand.groupby("_row"):
        cols[i, :len(g)], mask[i, :len(g)] = g.sort_values("k")._col.to_numpy(), True
    inside = np.zeros_like(r, dtype=bool)
    inside[np.arange(len(train))[:, None].repeat(n, 1)[mask], cols[mask]] = True
    ref_error = float(np.abs(np.take_along_axis(ref, cols, 1)[mask] - cand.sort_values(["_row", "k"]).ref_logp.to_numpy()).max())
    sigma_dt = np.array([r[i, cols[i, mask[i]]].std() for i in range(len(train))])  # Eq. 10 on D_t (population std)
    sigma_dt_safe = np.where(sigma_dt > 0, sigma_dt, 1.0)
    for name, lp in logps["train"].items():
        m = out["train"][name]
        m["eq12_rms_candidates"] = exact.candidate_eq12_rms(np.take_along_axis(lp, cols, 1), np.take_along_axis(ref, cols, 1),
                                                            np.take_along_axis(r, cols, 1), gamma, mask)
        m["eq12_rms_all"] = exact.eq12_rms(lp, ref, r, sigma_dt_safe, gamma)
        m["eq12_rms_sft_pairs"] = exact.eq12_rms(lp, ref, r, sigma_dt_safe, gamma, weights=np.exp(ref))
        m["outside_dt"] = exact.outside(lp, ref, r, inside)
        tie = exact.near_tie(lp, ref, r, sigma_dt_safe, gamma, V)
        seen = inside[np.arange(len(train)), tie["best"]] & inside[np.arange(len(train)), tie["second"]]
        m["near_tie"] = {k: float(np.mean(tie[k])) for k in
                         ("p_best", "p_second", "gap", "target_gap", "last_best", "last_second", "last_other", "r_best", "r_second", "r_other")}
        m["near_tie"] |= {"prompts_both_in_dt": int(seen.sum()),
                          "gap_both_in_dt": float(np.mean(tie["gap"][seen])) if seen.any() else None,
                          "target_gap_both_in_dt": float(np.mean(tie["target_gap"][seen])) if seen.any() else None}
    out["dt"] = {"prompts": len(train), "candidates_per_prompt": n, "distinct_per_prompt": float(inside.sum(1).mean()),
                 "sigma_dt_mean": float(sigma_dt.mean()), "sigma_sft_mean": float(exact.reward_std(ref, r).mean()),
                 "ref_logp_max_error": ref_error, "scored_by": cfg.rewards.reward_model}

    # the sampled metrics' names and shapes, on the test prompts
    ref_name, test = out["reference"], logps["test"]
    out["reward_kl"] = {m: {"reward": v["reward"], "kl": v["kl"], "exact": True} for m, v in out["test"].items()}
    out["win_rate"] = {m: exact.win_rate(test[ref_name], lp, rewards["test"]) | {"win_rate_ci": None, "exact": True}
                       for m, lp in test.items() if m != ref_name and ref_name in test}
    out["misalignment_rate"] = {m: v["misalignment_rate"] for m, v in out["test"].items()}
    log(f"exact: {len(specs) + 1} policies x {sum(out['prompts'].values())} prompts x {len(responses)} responses; "
        + ", ".join(f"{m} reward {v['reward']:.3f} KL {v['kl']:.3f}" for m, v in out["test"].items()))
    return out
