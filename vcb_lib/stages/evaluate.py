"""Stage 04 (notebook 04): every policy (π_sft and each trained method) samples the same test and
OOD prompts with the same seeds; the metrics of :mod:`vcb_lib.metrics` (Table 2, Fig. 5, A.5,
A.7, A.8) and the LLM judge of :mod:`vcb_lib.judge` (Fig. 4) score them.

Writes ``04_eval/<policy>/samples-<split>.parquet`` (reused while current) and
``04_eval/metrics.json``. :func:`run` is the whole stage: notebook 04, the sweeps and the panel
call it, so one config gives one ``metrics.json`` whichever front ran it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd

from vcb_lib.config import Config
from vcb_lib.io import atomic_write_bytes, read_json, write_json
from vcb_lib.judge import LOCAL_JUDGE_MODEL, JudgeClient, judge_win_rate
from vcb_lib.metrics import diversity, length_stats, misalignment, reward_kl_point, win_rate
from vcb_lib.stages import artefacts
from vcb_lib.stages.generate import check_rewards, sample_from_sft
from vcb_lib.data import task_of
from vcb_lib.stages.sft_and_reward import (evaluation_reward_name, has_evaluation_reward, load_evaluation_reward,
                                           load_reward_model, metrics_artefact)


def reference_method(cfg: Config) -> str:
    """The method the others are compared with: VCB when trained, else the first trained method."""
    return "vcb" if "vcb" in cfg.training.methods else cfg.training.methods[0]


def evaluation_reward(cfg: Config) -> tuple[str, str]:
    """``(column, name)`` of the evaluation reward: ``gold`` where there is one (``rewards.evaluation``,
    or the task's gold reward), else the reward model's ``reward``."""
    return ("gold" if has_evaluation_reward(cfg) else "reward"), evaluation_reward_name(cfg)


def sampling_settings(cfg: Config, split: str) -> dict:
    """How every policy samples ``split``. ``test``: the on-policy check of the pool, on the pool's prompts
    (the first ``evaluation.num_prompts`` of them; 0 = all) at the pool's length cap, temperature 1 and
    top_p 1, so that the on-policy mean and the pool's importance-weighted estimate measure the same
    E_π[r]. ``ood``: ``evaluation.ood_prompts`` at ``evaluation.temperature`` / ``max_new_tokens``."""
    from vcb_lib.data import task_prompts

    e = cfg.evaluation
    if split == "test":
        prompts = task_prompts(task_of(cfg), "test", e.pool_prompts)
        return {"prompts": prompts[:e.num_prompts] if e.num_prompts else prompts, "temperature": 1.0,
                "max_new_tokens": e.pool_max_new_tokens or e.max_new_tokens}
    return {"prompts": task_prompts(task_of(cfg), split, e.ood_prompts), "temperature": e.temperature,
            "max_new_tokens": e.max_new_tokens}


class SharedSampler:
    """One sampler for stage 04 (``sampling.backend``: one vLLM engine per run, not one per policy),
    opened on π_sft when first needed; each policy's weights are loaded into it in turn
    (``sync_weights``, as the on-policy rounds do). ``with SharedSampler(cfg) as s: s.get(ref, tok)``."""

    def __init__(self, cfg: Config, *, log=print):
        self.cfg, self.log, self.sampler = cfg, log, None

    def get(self, ref, tok):
        from vcb_lib.samplers import make_sampler

        if self.sampler is None:
            c = self.cfg
            self.sampler = make_sampler(c.sampling.backend, artefacts.sft_spec(c), model=ref, tokenizer=tok,
                                        batch_size=c.sampling.batch_size, seed=c.run.seed, cache_dir=c.models.cache_dir,
                                        log=self.log)
        return self.sampler

    def __enter__(self) -> "SharedSampler":
        return self

    def __exit__(self, *exc) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None


def sample_policies(cfg: Config, split: str, policies: list[str] | None = None, *, log=print,
                    shared: SharedSampler | None = None) -> pd.DataFrame:
    """``evaluation.samples_per_prompt`` samples per ``split`` prompt ("test" or "ood",
    :func:`sampling_settings`) from every policy (or those named in ``policies``), with what the
    metrics need: the reward model's ``reward``, the evaluation reward ``gold`` (where there is one),
    log π of each sample (the sampler's, raw) and log π_sft (for KL and misalignment). Common random
    numbers: every policy samples the same prompts with the same seed per prompt (two equal policies
    draw the same text). One sampler serves every policy (``shared``; opened here when None); returns
    all rows, ``method`` naming the policy."""
    from vcb_lib.data import build_candidates
    from vcb_lib.manifest import key_hash
    from vcb_lib.models import format_prompt, load_policy, load_tokenizer

    e, specs = cfg.evaluation, artefacts.policy_specs(cfg, policies)
    settings = sampling_settings(cfg, split)
    ref_spec = artefacts.sft_spec(cfg)
    ref, tok = None, load_tokenizer(ref_spec, cache_dir=cfg.models.cache_dir)
    rm, gold = None, None
    tables = []
    with contextlib.ExitStack() as stack:
        if shared is None:
            shared = stack.enter_context(SharedSampler(cfg, log=log))
        for name, spec in specs.items():
            art = artefacts.samples(cfg, name, split)
            if art.current():
                tables.append(check_rewards(pd.read_parquet(art.path), ("reward", "gold"), str(art.path)))
                continue
            art = artefacts.own(cfg, art)
            art.invalidate()
            if ref is None:
                ref = load_policy(ref_spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
                rm = load_reward_model(cfg)
                gold = load_evaluation_reward(cfg)
            policy = ref if name == "sft" else load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
            sampler = shared.get(ref, tok)
            sampler.sync_weights(policy)
            table = build_candidates(settings["prompts"], sampler, art.path.parent / f"shards-{split}",
                                     n=e.samples_per_prompt, temperature=settings["temperature"],
                                     max_new_tokens=settings["max_new_tokens"], seed=cfg.run.seed + 1000,
                                     format_prompt=lambda p: format_prompt(tok, p), ref_model=ref, tokenizer=tok,
                                     manifest={"policy": name, "config": key_hash(art.key), "sampler": sampler.name},
                                     progress=False, shard_size=64)  # vLLM: 205 tok/s at 64 prompts x 2 vs 180 at 16 (same samples)
            table = table.rename(columns={"sampler_logp": "policy_logp"})  # log π (raw); ref_logp = log π_sft
            table["reward"] = rm.score(list(table.prompt), list(table.response))
            if gold is not None:
                table["gold"] = gold.score(list(table.prompt), list(table.response))
            table["method"] = name
            check_rewards(table, ("reward", "gold"), f"{name} samples [{split}]")
            atomic_write_bytes(art.path, table.to_parquet(index=False))
            art.seal()
            log(f"{name} [{split}]: {len(table)} samples, mean reward {table.reward.mean():.3f}")
            tables.append(table)
    return pd.concat(tables, ignore_index=True)


def build_pool(cfg: Config, *, log=print, shared: SharedSampler | None = None) -> pd.DataFrame:
    """The shared held-out pool: ``evaluation.pool_candidates`` candidates for each of the first
    ``evaluation.pool_prompts`` test prompts, drawn once from π_sft at temperature 1 and top_p 1
    (importance weights π/π_sft need π_sft's own distribution), with log π_sft, the reward
    model's ``reward`` and the evaluation reward. Reused while current; resumes from its shards."""
    art, e = artefacts.pool(cfg), cfg.evaluation
    if art.current():
        return check_rewards(pd.read_parquet(art.path), ("reward", "gold", "ref_logp"), str(art.path))
    table = sample_from_sft(cfg, artefacts.own(cfg, art), "test", e.pool_prompts, n=e.pool_candidates, temperature=1.0,
                            max_new_tokens=e.pool_max_new_tokens or e.max_new_tokens, seed=cfg.run.seed + 2000,
                            top_p=1.0, log=log, get_sampler=None if shared is None else shared.get)
    log(f"pool: {table.prompt_id.nunique()} prompts x {cfg.evaluation.pool_candidates} candidates from π_sft")
    return table


def pool_logps(cfg: Config, pool: pd.DataFrame, *, log=print) -> dict[str, np.ndarray]:
    """log π of every pool candidate (rows in the pool's order) under every policy, every training
    seed's replicate included (``artefacts.replicate`` names them): one scoring pass per policy,
    each prompt forwarded once for its candidates; π_sft's are the pool's own."""
    from vcb_lib.logps import sequence_logps
    from vcb_lib.models import load_policy, load_tokenizer

    out = {"sft": pool.ref_logp.to_numpy(dtype=np.float64)}
    for method, seed in ((m, s) for m in cfg.training.methods for s in artefacts.training_seeds(cfg)):
        name, art = artefacts.replicate(cfg, method, seed), artefacts.pool_scores(cfg, method, seed)
        if art.current():
            scores = pd.read_parquet(art.path)
        else:
            art = artefacts.own(cfg, art)
            spec = str(artefacts.method(cfg, method, seed).require() / "final")
            model = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
            tok = load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
            lp = sequence_logps(model, tok, list(pool.model_input), [list(map(int, ids)) for ids in pool.response_ids],
                                batch_size=16, autocast_bf16=cfg.training.bf16)
            scores = pd.DataFrame({"prompt_id": pool.prompt_id, "k": pool.k, "logp": lp.numpy().astype(np.float64)})
            atomic_write_bytes(art.path, scores.to_parquet(index=False))
            art.seal()
            log(f"pool: scored {len(scores)} candidates under {name}")
        if not (scores.prompt_id.to_numpy() == pool.prompt_id.to_numpy()).all():
            raise ValueError(f"{art.path} does not match the pool's rows: rebuild it (delete its manifest)")
        out[name] = check_rewards(scores, ("logp",), str(art.path)).logp.to_numpy(dtype=np.float64)
    return out


def pool_per_prompt(cfg: Config, policy: str) -> pd.Series:
    """Per pool prompt, the SNIS estimate of E_π[evaluation reward | x] under ``policy`` (``sft`` or a
    trained method's main replicate), indexed by prompt_id in the pool's order: the per-prompt
    values ``metrics["pool"]`` averages, read back from the stored pool and scores (both checked)."""
    from vcb_lib.metrics import snis

    pool = pd.read_parquet(artefacts.pool(cfg).require())
    lp = pool.ref_logp
    if policy != "sft":
        art = artefacts.pool_scores(cfg, policy)
        scores = pd.read_parquet(art.require())
        if not (scores.prompt_id.to_numpy() == pool.prompt_id.to_numpy()).all():
            raise ValueError(f"{art.path} does not match the pool's rows: rebuild it (delete its manifest)")
        lp = scores.logp
    est, _ = snis(_grid(pool.assign(_lp=lp.to_numpy()), "_lp"), _grid(pool, "ref_logp"), _grid(pool, evaluation_reward(cfg)[0]))
    return pd.Series(est, index=pool.prompt_id.unique())


def on_policy_per_prompt(samples: pd.DataFrame, policy: str, column: str) -> pd.Series:
    """Per prompt, the mean ``column`` of ``policy``'s own samples (the on-policy estimate of E_π[r | x]),
    indexed by prompt_id in sampling order."""
    t = samples[samples.method == policy]
    return pd.Series(_grid(t, column).mean(axis=1), index=t.prompt_id.unique())


def pool_validity(pool_est: pd.Series, on_policy: pd.Series, ess: np.ndarray, m: int, *, bootstrap: int,
                  seed: int) -> dict:
    """Is the pool valid for one policy? Its estimate minus the on-policy one on the prompts both have
    (``bias``, 95% CI over prompts: it should include 0) and the per-prompt ESS as a share of m
    (``estimators.pool_valid``: the rule the exact tier calibrated). ``valid`` needs both."""
    from vcb_lib.estimators import pool_valid
    from vcb_lib.metrics import paired_difference

    common = on_policy.index.intersection(pool_est.index)
    d = paired_difference(pool_est.loc[common].to_numpy(), on_policy.loc[common].to_numpy(), bootstrap=bootstrap, seed=seed)
    frac = np.asarray(ess, dtype=np.float64) / m
    ess_ok = bool(pool_valid(np.asarray(ess, dtype=np.float64), m))
    why = [w for w, bad in (("pool − on-policy CI excludes 0", d["resolved"]), ("ESS below the calibrated threshold", not ess_ok))
           if bad]
    return {"bias": d["diff"], "bias_ci": d["ci"], "bias_prompts": int(len(common)),
            "ess_fraction": {"mean": float(frac.mean()), "p10": float(np.quantile(frac, 0.1)), "min": float(frac.min())},
            "valid": not why, "why_not": why}


def pool_metrics(cfg: Config, pool: pd.DataFrame, logps: dict[str, np.ndarray], samples: pd.DataFrame | None = None) -> dict:
    """``metrics["pool"]``: per policy the importance-sampled expected evaluation reward ("gold")
    and reward-model reward ("rm") with CIs and ESS, the Eq. 12 calibration slope, R² and Spearman,
    and the misalignment rate (A.5, π_sft excluded: it is the reference); paired differences of the
    reference method against every other policy, with CIs over prompts, the minimum detectable
    effect and ``power``: the CI half-width at 1, 2 and 4 times the prompts and 1 and 2 times the candidates,
    measured on this pool and predicted beyond it (:func:`vcb_lib.metrics.power_curve`).

    With ``samples`` (every policy's on-policy test samples, :func:`sampling_settings`): per policy its
    on-policy estimate with its CI and the pool's validity (:func:`pool_validity`); per comparison the
    on-policy paired difference (common random numbers), and ``decided_by``: the pool where it is valid
    for both policies, else the on-policy samples, whose numbers then stand in ``gold_diff``, ``ci``,
    ``resolved`` and ``mde`` (the pool's stay under ``pool``)."""
    from vcb_lib.metrics import (ESS_MIN_FRACTION, MDE_FACTOR, bootstrap_mean_ci, calibration, paired_difference,
                                 pool_estimate, power_curve)
    from vcb_lib.theory import misalignment_rate

    e, seed = cfg.evaluation, cfg.run.seed
    judge_col, judge_name = evaluation_reward(cfg)
    ref, rm, gold = _grid(pool, "ref_logp"), _grid(pool, "reward"), _grid(pool, judge_col)
    reference = reference_method(cfg)
    methods, per_prompt = {}, {}
    for name, lp in logps.items():
        policy = _grid(pool.assign(_lp=lp), "_lp")
        g = pool_estimate(policy, ref, gold, bootstrap=e.bootstrap, seed=seed)
        r = pool_estimate(policy, ref, rm, bootstrap=e.bootstrap, seed=seed)
        cal = calibration(policy, ref, rm, cfg.training.gamma, bootstrap=e.bootstrap, seed=seed)
        rate, rates = misalignment_rate(policy, ref, rm, per_prompt=True) if name != "sft" else (None, None)
        per_prompt[name] = {"gold": g.pop("per_prompt"), "rm": r.pop("per_prompt"), "misalignment": rates, "ess": g.pop("ess")}
        r.pop("ess")
        methods[name] = {"gold": g["mean"], "gold_ci": g["ci"], "rm": r["mean"], "rm_ci": r["ci"],
                         "ess_mean": g["ess_mean"], "ess_min": g["ess_min"], "ess_flag": g["ess_flag"],
                         "slope": cal["slope"], "slope_ci": cal["slope_ci"], "r2": cal["r2"], "spearman": cal["spearman"],
                         "spearman_ci": cal["spearman_ci"], "calibration_pairs": cal["pairs"],
                         "misalignment_rate": None if rate is None or np.isnan(rate) else float(rate)}
        if cal.get("degenerate"):
            methods[name]["degenerate"] = cal["degenerate"]
        if samples is not None and name in set(samples.method):
            on = on_policy_per_prompt(samples, name, judge_col)
            per_prompt[name]["on_policy"] = on
            methods[name] |= {"on_policy": float(on.mean()), "on_policy_ci": bootstrap_mean_ci(
                on.to_numpy(), bootstrap=e.bootstrap, seed=seed), "on_policy_prompts": int(len(on))}
            pool_est = pd.Series(per_prompt[name]["gold"], index=pool.prompt_id.unique())
            methods[name]["validity"] = pool_validity(pool_est, on, per_prompt[name]["ess"], ref.shape[1],
                                                      bootstrap=e.bootstrap, seed=seed)
    main = {"sft", *cfg.training.methods}
    replicates = {n: v for n, v in methods.items() if n not in main}
    methods = {n: v for n, v in methods.items() if n in main}
    paired = {}
    for other in methods:
        if other == reference or reference not in methods:
            continue
        a, b = per_prompt[reference], per_prompt[other]
        d = paired_difference(a["gold"], b["gold"], bootstrap=e.bootstrap, seed=seed)
        d_rm = paired_difference(a["rm"], b["rm"], bootstrap=e.bootstrap, seed=seed)
        entry = {"gold_diff": d["diff"], "ci": d["ci"], "resolved": d["resolved"], "mde": d["mde"],
                 "rm_diff": d_rm["diff"], "rm_ci": d_rm["ci"], "rm_resolved": d_rm["resolved"]}
        if a["misalignment"] is not None and b["misalignment"] is not None:
            both = np.isfinite(a["misalignment"]) & np.isfinite(b["misalignment"])
            if both.sum() >= 2:
                mis = paired_difference(a["misalignment"][both], b["misalignment"][both], bootstrap=e.bootstrap, seed=seed)
                entry |= {"misalignment_diff": mis["diff"], "misalignment_ci": mis["ci"], "misalignment_resolved": mis["resolved"]}
        if ref.shape[0] >= 2 and ref.shape[1] >= 2:  # what more prompts or candidates would buy
            P, m = ref.shape
            entry["power"] = power_curve(_grid(pool.assign(_lp=logps[reference]), "_lp"),
                                         _grid(pool.assign(_lp=logps[other]), "_lp"), ref, gold,
                                         prompts=(P, 2 * P, 4 * P), candidates=(m, 2 * m), repeats=100, seed=seed)
            del entry["power"]["measured"]
        if "on_policy" in a and "on_policy" in b:  # common random numbers: the same prompts and seeds
            on = paired_difference(a["on_policy"].to_numpy(), b["on_policy"].to_numpy(), bootstrap=e.bootstrap, seed=seed)
            entry["on_policy"] = on
            valid = methods[reference]["validity"]["valid"] and methods[other]["validity"]["valid"]
            entry["decided_by"] = "pool" if valid else "on-policy"
            if not valid:
                entry["pool"] = {k: entry[k] for k in ("gold_diff", "ci", "resolved", "mde")}
                entry |= {"gold_diff": on["diff"], "ci": on["ci"], "resolved": on["resolved"], "mde": on["mde"]}
        paired[f"{reference}-vs-{other}"] = entry
    out = {"prompts": int(ref.shape[0]), "candidates_per_prompt": int(ref.shape[1]), "reference": reference,
           "gold_name": judge_name, "gamma": cfg.training.gamma, "ess_threshold": ESS_MIN_FRACTION * ref.shape[1],
           "mde_factor": MDE_FACTOR, "methods": methods, "paired": paired}
    if len(artefacts.training_seeds(cfg)) > 1:
        out["seeds"] = seed_spread(cfg, per_prompt, replicates | methods)
    return out


def seed_spread(cfg: Config, per_prompt: dict[str, dict], estimates: dict[str, dict]) -> dict:
    """How much of a comparison's spread comes from the training seed rather than from the prompts:
    per method the pool estimate of each training seed's replicate; per comparison (the reference
    method against each other policy, seed by seed; π_sft has one) the per-seed differences, their
    mean with a t interval across seeds, their SD across seeds, and the SE over prompts of one seed's
    difference (the bootstrap SE that the single-seed CIs above reflect)."""
    from vcb_lib.metrics import seed_interval

    seeds, reference = artefacts.training_seeds(cfg), reference_method(cfg)
    names = {m: [artefacts.replicate(cfg, m, s) for s in seeds] for m in cfg.training.methods} | {"sft": ["sft"] * len(seeds)}
    methods = {m: {"gold": [estimates[n]["gold"] for n in ns]} | seed_interval([estimates[n]["gold"] for n in ns])
               for m, ns in names.items() if m != "sft"}
    paired = {}
    for other in names:
        if other == reference:
            continue
        diffs, ses = [], []
        for a, b in zip(names[reference], names[other]):
            d = per_prompt[a]["gold"] - per_prompt[b]["gold"]
            diffs.append(float(d.mean()))
            ses.append(float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"))
        paired[f"{reference}-vs-{other}"] = {"diffs": diffs, **seed_interval(diffs),
                                             "se_prompts": float(np.nanmean(ses)) if np.isfinite(ses).any() else None}
    return {"seeds": seeds, "methods": methods, "paired": paired}


def dt_reward(cfg: Config) -> dict:
    """What scored D_t and how well it agrees with the evaluation reward: the reward model's
    held-out pair accuracy (stage 01) and its Spearman ρ with the gold reward on D_t itself."""
    from vcb_lib.stages.generate import read_candidates

    table = read_candidates(cfg)
    s1 = read_json(metrics_artefact(cfg).path) if metrics_artefact(cfg).current() else {}
    rho = float(table.reward.rank().corr(table.gold.rank())) if "gold" in table else None
    return {"name": cfg.rewards.reward_model, "heldout_accuracy": s1.get("accuracy"),
            "heldout_pairs": s1.get("heldout_pairs"), "spearman_gold_on_dt": None if rho is None or np.isnan(rho) else rho}


def _grid(table: pd.DataFrame, column: str) -> np.ndarray:
    """(N·k,) rows of one policy -> (N, k) by prompt (prompt order of first appearance) and k."""
    wide = table.pivot(index="prompt_id", columns="k", values=column)
    return wide.loc[table.prompt_id.unique()].to_numpy(dtype=np.float64)


def reward_kl_curve(cfg: Config, samples: pd.DataFrame, *, log=print) -> dict[str, list[dict]]:
    """Fig. 5 along training, per method, on the first ``evaluation.curve_prompts`` test prompts:
    step 0 (π_sft) and the final step from the evaluation ``samples``, the steps between from the
    snapshots ``trainers.CurveSampler`` sampled during training (``03_train/<method>/curve/``; log
    π_sft and the reward are computed here). Each point: mean evaluation reward and KL(π‖π_sft),
    both with SEs over prompts. ``{}`` when ``evaluation.curve_points`` is 0. Writes the scored
    snapshot samples to ``04_eval/curve.parquet``."""
    from vcb_lib.logps import sequence_logps
    from vcb_lib.models import load_policy, load_tokenizer

    if not cfg.evaluation.curve_points:
        return {}
    judge_col, _ = evaluation_reward(cfg)
    folders = {m: artefacts.method(cfg, m).require() for m in cfg.training.methods}
    frames = [pd.read_parquet(f).assign(method=m) for m, folder in folders.items()
              for f in sorted((folder / "curve").glob("step-*.parquet"))]
    snapshots = pd.concat(frames, ignore_index=True) if frames else None
    if snapshots is not None:
        spec = artefacts.sft_spec(cfg)
        ref, tok = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir), load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
        snapshots["ref_logp"] = sequence_logps(ref, tok, list(snapshots.model_input),  # the sampler encoded the same text
                                               [list(map(int, ids)) for ids in snapshots.response_ids], batch_size=16).numpy()
        judge = load_evaluation_reward(cfg) if judge_col == "gold" else load_reward_model(cfg)
        snapshots[judge_col] = judge.score(list(snapshots.prompt), list(snapshots.response))
        atomic_write_bytes(cfg.stage_dir("04_eval") / "curve.parquet", snapshots.to_parquet(index=False))
    ids = set(samples[samples.method == "sft"].prompt_id.unique()[:cfg.evaluation.curve_prompts])

    def point(t, step: int) -> dict:
        p = reward_kl_point(_grid(t, judge_col), _grid(t, "policy_logp"), _grid(t, "ref_logp"))
        return {"step": step, "reward": p["mean_reward"], "reward_se": p["reward_se"], "kl": p["kl"], "kl_se": p["kl_se"]}

    curve = {}
    for method, folder in folders.items():
        total = read_json(folder / "summary.json")["steps"]
        final = samples[(samples.method == method) & samples.prompt_id.isin(ids)]
        steps = snapshots[snapshots.method == method] if snapshots is not None else final.iloc[:0]
        curve[method] = [point(samples[(samples.method == "sft") & samples.prompt_id.isin(ids)], 0),
                         *(point(t, int(s)) for s, t in steps.groupby("step", sort=True)), point(final, total)]
    log(f"Fig. 5 curve: {sum(map(len, curve.values()))} points over {len(curve)} methods")
    return curve


def judge_model(cfg: Config) -> str:
    """The judge's model: ``evaluation.judge_model``, or with ``judge: local`` the packaged SmolLM2."""
    e = cfg.evaluation
    return e.judge_model or (LOCAL_JUDGE_MODEL if e.judge == "local" else "")


def check_judge(cfg: Config) -> None:
    """Fail before any sampling when the judge cannot run: a URL without ``judge_model``; ``local``
    without vLLM installed (the message gives the install command)."""
    import importlib.util

    from vcb_lib.judge import VLLM_INSTALL

    e = cfg.evaluation
    if e.judge and e.judge != "local" and not e.judge_model:
        raise ValueError("evaluation.judge is a URL but evaluation.judge_model is empty: name the judge's model")
    if e.judge == "local" and importlib.util.find_spec("vllm") is None:
        raise RuntimeError(f"evaluation.judge is 'local' but vLLM is not installed: {VLLM_INSTALL}; "
                           "or set evaluation.judge to the URL of an OpenAI-compatible server")


def judge_win_rates(cfg: Config, samples: pd.DataFrame, *, reference: str | None = None,
                    client: JudgeClient | None = None, about: dict | None = None, log=print) -> dict[str, dict]:
    """Fig. 4 analogue: the LLM judge (A.3 prompts, both orders) on ``reference``'s first sample
    per test prompt against every other policy's, on the same prompts. Off (``{}``) unless
    ``evaluation.judge`` is set:

    - a URL: an OpenAI-compatible endpoint serving ``evaluation.judge_model``; the key comes from
      ``$VCB_JUDGE_API_KEY`` (or ``$OPENAI_API_KEY``);
    - ``local``: vLLM's OpenAI-compatible server is started on 127.0.0.1 for the judging, serving
      :func:`judge_model` (its log: ``04_eval/judge/server.log``), with replies constrained to the
      A.3 answer format (:data:`vcb_lib.judge.A3_REPLY_REGEX`), and stopped afterwards.

    ``client`` replaces the one ``evaluation.judge`` names. The prompt kind is the task's
    (``Task.judge_kind``); a prompt with an unparseable reply is excluded from the win rate and
    counted (``n_excluded`` prompts, ``n_malformed`` replies), never scored as a tie. Each judged pair is
    saved as it comes (``04_eval/judge/<reference>-vs-<method>.jsonl``, keyed by the judge and the
    texts): a judge that fails part-way raises naming the pairs done, and a rerun asks only for
    the rest. ``about``, when given, is filled with what judged (endpoint, model, server start
    time, requests, seconds): ``metrics["judge"]``."""
    from vcb_lib.judge import A3_REPLY_REGEX, open_judge

    e = cfg.evaluation
    if client is None and not e.judge:
        return {}
    about = {} if about is None else about
    folder = cfg.stage_dir("04_eval", create=False) / "judge"
    if client is not None:
        about |= {"endpoint": client.url, "model": client.model, "constrained": "structured_outputs" in client.extra_body}
        return _judge_comparisons(cfg, samples, client, reference, folder, about, None, log)
    check_judge(cfg)
    model = judge_model(cfg)
    about |= {"endpoint": e.judge, "model": model, "constrained": e.judge == "local"}
    with open_judge(e.judge, model, reply_regex=A3_REPLY_REGEX, log_path=folder / "server.log", cache_dir=cfg.models.cache_dir,
                    start_timeout=e.judge_start_timeout, log=log) as (client, server):
        if server is not None:
            about |= {"served_by": "vLLM OpenAI-compatible server on 127.0.0.1", "start_seconds": server.start_seconds,
                      "log": str(server.log_path)}
        return _judge_comparisons(cfg, samples, client, reference, folder, about, server, log)


def _pair_key(judge: str, kind: str, prompt: str, response_1: str, response_2: str) -> str:
    from vcb_lib.manifest import key_hash

    return key_hash({"judge": judge, "kind": kind, "prompt": prompt, "response_1": response_1, "response_2": response_2})


def _judge_comparisons(cfg: Config, samples: pd.DataFrame, client: JudgeClient, reference: str | None, folder,
                       about: dict, server, log) -> dict[str, dict]:
    """:func:`judge_win_rates` with its client: each comparison resumed from and saved to its jsonl."""
    import json
    import time

    from vcb_lib.judge import JudgeRunError

    e = cfg.evaluation
    reference = reference or reference_method(cfg)
    kind = task_of(cfg).judge_kind
    # what a saved verdict depends on besides the texts (not the URL: a restarted server has another port)
    judge = json.dumps([client.model, client.temperature, client.max_tokens, client.extra_body], sort_keys=True)
    first = samples[samples.k == 0]
    by = {m: t.set_index("prompt_id") for m, t in first.groupby("method", sort=False)}
    ref = by[reference]
    folder.mkdir(parents=True, exist_ok=True)
    out, requests, started = {}, 0, time.perf_counter()
    for method, t in by.items():
        if method == reference:
            continue
        ids = [i for i in ref.index if i in t.index]
        prompts, mine, theirs = list(ref.loc[ids, "prompt"]), list(ref.loc[ids, "response"]), list(t.loc[ids, "response"])
        keys = [_pair_key(judge, kind, *texts) for texts in zip(prompts, mine, theirs)]
        path = folder / f"{reference}-vs-{method}.jsonl"
        saved = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a crash
                    row = json.loads(line)
                    if len(row["verdicts"]) == 2 and all(v in ("A", "B", "C", "?") for v in row["verdicts"]):
                        saved[row["key"]] = row["verdicts"]
        done = {i: saved[k] for i, k in enumerate(keys) if k in saved}
        if done:
            log(f"judge: {reference} vs {method}: {len(done)} of {len(ids)} pairs judged before, resumed")
        with open(path, "a") as f:
            def save(i: int, verdicts: tuple[str, str]) -> None:
                f.write(json.dumps({"key": keys[i], "prompt_id": str(ids[i]), "verdicts": list(verdicts)}) + "\n")
                f.flush()

            try:
                out[method] = judge_win_rate(client, prompts, mine, theirs, kind, on_malformed="exclude",
                                             max_workers=e.judge_workers, bootstrap=e.bootstrap, seed=cfg.run.seed,
                                             done=done, on_pair=save)
            except JudgeRunError as err:
                judged = sorted(err.done)
                named = ", ".join(str(ids[i]) for i in judged[:10]) + (", ..." if len(judged) > 10 else "")
                died = server.exit_report() if server is not None else None
                finished = f"; comparisons finished before: {', '.join(out)}" if out else ""
                raise RuntimeError(
                    f"judge: {reference} vs {method} stopped after {len(judged)} of {len(ids)} pairs"
                    f"{f' (prompts {named})' if judged else ''}; they are saved in {path} and a rerun resumes from "
                    f"them{finished}. Cause: {err.__cause__}" + (f"\n{died}" if died else "")) from err
        requests += 2 * (len(ids) - len(done))
        o = out[method]
        log(f"judge: {reference} vs {method}: " + (f"win {o['win']:.2f} tie {o['tie']:.2f} lose {o['lose']:.2f}; same "
            f"position in both orders {o['same_position']:.2f} " if o["n_judged"] else "no prompt judged ")
            + f"({o['n_judged']} of {len(ids)} prompts; {o['n_excluded']} excluded: a reply with no verdict)")
    seconds = time.perf_counter() - started
    about |= {"requests": requests, "seconds": seconds}
    log(f"judge: {requests} requests in {seconds:.0f} s ({requests / seconds if seconds else 0:.1f}/s)")
    return out


def summarise(cfg: Config, samples: pd.DataFrame, ood_samples: pd.DataFrame | None = None, *,
              reference: str | None = None) -> dict:
    """``04_eval/metrics.json``: stable keys, each per method.

    ``win_rate`` (Table 2: ``reference`` vs every other policy under the evaluation reward),
    ``reward_kl`` (Fig. 5), ``misalignment_rate`` (A.5, under the reward model, as in the paper),
    ``diversity`` (A.8), ``length`` (A.7), ``ood_win_rate`` (Table 5) and ``rm_accuracy`` (Table 4);
    ``evaluation_reward`` / ``evaluation_reward_name`` say which reward the comparisons use."""
    from vcb_lib.models import load_tokenizer

    e = cfg.evaluation
    reference = reference or reference_method(cfg)
    judge_col, judge_name = evaluation_reward(cfg)
    by = {m: t for m, t in samples.groupby("method", sort=False)}
    vocab = len(load_tokenizer(artefacts.sft_spec(cfg), cache_dir=cfg.models.cache_dir))
    metrics: dict = {"evaluation_reward": judge_col, "evaluation_reward_name": judge_name, "reference": reference,
                     "scale": {"prompts": int(samples.prompt_id.nunique()), "samples_per_prompt": e.samples_per_prompt,
                               "policy": cfg.models.policy, "task": task_of(cfg).name, "seed": cfg.run.seed}}

    def wins(groups):
        return {m: win_rate(_grid(groups[reference], judge_col), _grid(t, judge_col), bootstrap=e.bootstrap, seed=cfg.run.seed)
                for m, t in groups.items() if m != reference}

    metrics["win_rate"] = wins(by) if reference in by else {}
    metrics["reward_kl"] = {}
    for m, t in by.items():
        point = reward_kl_point(_grid(t, judge_col), _grid(t, "policy_logp"), _grid(t, "ref_logp"))
        metrics["reward_kl"][m] = {"reward": point["mean_reward"], "reward_se": point["reward_se"],
                                   "kl": point["kl"], "kl_se": point["kl_se"]}
    # A.5; π_sft is the reference (log π/π_sft = 0 up to float noise between two log-prob paths): not scored
    metrics["misalignment_rate"] = {m: None if m == "sft" else
                                    misalignment(_grid(t, "policy_logp"), _grid(t, "ref_logp"), _grid(t, "reward"))["misalignment_rate"]
                                    for m, t in by.items()}
    metrics["diversity"] = {  # EAD on token ids with V = the tokenizer's vocabulary (Liu et al. 2022); BLEU on text
        m: diversity([[list(ids) for ids in g.response_ids] for _, g in t.groupby("prompt_id", sort=False)],
                     vocab_size=vocab, bleu_texts=[list(g.response) for _, g in t.groupby("prompt_id", sort=False)])
        for m, t in by.items()}
    metrics["length"] = {m: length_stats(t.n_tokens.to_numpy()) for m, t in by.items()}
    if ood_samples is not None and len(ood_samples):
        metrics["ood_win_rate"] = wins({m: t for m, t in ood_samples.groupby("method", sort=False)})
    rm_metrics = metrics_artefact(cfg)
    metrics["rm_accuracy"] = {k: v for k, v in read_json(rm_metrics.path).items() if k != "sft"} \
        if rm_metrics.current() else None  # (π_sft's path differs between runs sharing one upstream)
    return metrics


def splits(cfg: Config) -> list[str]:
    """The prompt splits every policy samples: "test", and "ood" where the task has OOD prompts."""
    task = task_of(cfg)
    if task.source == "data":
        from vcb_lib.data import task_prompts

        return ["test", *(["ood"] if task_prompts(task, "ood") else [])]
    return ["test", *(["ood"] if task.source == "embedded" or task.ood else [])]


def run(cfg: Config, *, log=print) -> dict:
    """The stage: sample (or reuse) every policy on the test and OOD prompts, summarise, add the
    Fig. 5 curve and the judge, write ``04_eval/metrics.json``; returns the metrics."""
    check_judge(cfg)  # before the sampling, not after it
    task = task_of(cfg)
    with SharedSampler(cfg, log=log) as shared:  # one engine for the pool and every policy's samples
        pool = build_pool(cfg, log=log, shared=shared)
        samples = sample_policies(cfg, "test", log=log, shared=shared)
        ood = sample_policies(cfg, "ood", log=log, shared=shared) if "ood" in splits(cfg) else None
    metrics = summarise(cfg, samples, ood)
    metrics["pool"] = pool_metrics(cfg, pool, pool_logps(cfg, pool, log=log), samples)
    metrics["dt_reward"] = dt_reward(cfg)
    metrics["reward_kl_curve"] = reward_kl_curve(cfg, samples, log=log)  # {} unless evaluation.curve_points > 0
    metrics["judge"] = {}  # what judged: endpoint, model, server start time (empty when off)
    metrics["judge_win_rate"] = judge_win_rates(cfg, samples, about=metrics["judge"], log=log)  # {} unless evaluation.judge is set
    if task.exact:  # every response enumerable: exact E_π[r], KL, π_opt, Eq. 12, ... (vcb_lib.stages.exact)
        from vcb_lib.stages import exact

        metrics["exact"] = exact.evaluate(cfg, reference_method(cfg), log=log)
    art = artefacts.eval_metrics(cfg)
    write_json(art.path, metrics)
    art.seal()
    return metrics


def read_metrics(cfg: Config) -> dict:
    """``04_eval/metrics.json``, checked current for this config."""
    return read_json(artefacts.eval_metrics(cfg).require())


def read_samples(cfg: Config, split: str = "test") -> pd.DataFrame:
    """The stored evaluation samples of every policy, checked (stage 04 must have run)."""
    return pd.concat([pd.read_parquet(artefacts.samples(cfg, p, split).require()) for p in ["sft", *cfg.training.methods]],
                     ignore_index=True)
