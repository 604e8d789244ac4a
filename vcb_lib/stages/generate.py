"""Stage 02 (notebook 02, Sec. 4.3 step 2): the candidate table D_t: n candidates per train
prompt from π_sft (or imported from ``data.candidates``), their reference log-probs (computed once,
here), their rewards (``rewards.reward_model``, or the file's) and, where there is one, the
evaluation reward (``gold``).

Writes ``02_candidates/candidates.parquet`` (reused while current; an interrupted run resumes
from its shards) and ``02_candidates/metrics.json``.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from vcb_lib.config import Config
from vcb_lib.io import atomic_write_bytes, write_json
from vcb_lib.manifest import Artefact, key_hash
from vcb_lib.stages import artefacts
from vcb_lib.stages.sft_and_reward import load_evaluation_reward, load_reward_model

STAGE = "02_generate"


def check_rewards(table: pd.DataFrame, columns: tuple[str, ...], where: str) -> pd.DataFrame:
    """Every reward column finite, else a ValueError naming the column, the rows and the file."""
    for column in columns:
        if column in table:
            bad = ~np.isfinite(table[column].to_numpy(dtype=np.float64))
            if bad.any():
                raise ValueError(f"{where}: {int(bad.sum())} non-finite value(s) in column {column!r} "
                                 f"(first rows {np.flatnonzero(bad)[:5].tolist()}); rewards must be finite numbers")
    return table


def read_candidates(cfg: Config) -> pd.DataFrame:
    """D_t, checked: current for this config, intact, finite rewards."""
    path = artefacts.candidates(cfg).require()
    return check_rewards(pd.read_parquet(path), ("reward", "gold", "ref_logp"), str(path))


def sample_from_sft(cfg: Config, art: Artefact, split: str, limit: int, *, n: int, temperature: float,
                    max_new_tokens: int, seed: int, top_p: float, log=print, get_sampler=None) -> pd.DataFrame:
    """Build ``art`` (a candidate table): ``n`` candidates for each of the first ``limit``
    ``split`` prompts from π_sft (resuming from shards beside it), their log π_sft, the reward
    model's ``reward`` and, where the task has one, the gold reward; checked finite, then sealed.
    D_t and the evaluation pool are both built by it. ``get_sampler(model, tokenizer)``: a sampler already
    open, e.g. stage 04's (one engine for the pool and every policy's samples): it is given π_sft's
    weights here and left open."""
    from vcb_lib.data import build_candidates, task_of, task_prompts
    from vcb_lib.models import format_prompt, load_policy, load_tokenizer
    from vcb_lib.samplers import make_sampler

    art.invalidate()
    spec = artefacts.sft_spec(cfg)
    model = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
    tok = load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
    own = get_sampler is None
    if own:
        sampler = make_sampler(cfg.sampling.backend, spec, model=model, tokenizer=tok, batch_size=cfg.sampling.batch_size,
                               seed=cfg.run.seed, cache_dir=cfg.models.cache_dir, log=log)
    else:
        sampler = get_sampler(model, tok)
        sampler.sync_weights(model)
    prompts = task_prompts(task_of(cfg), split, limit)
    table = build_candidates(prompts, sampler, art.path.parent, n=n, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed, top_p=top_p, ref_model=model, tokenizer=tok,
                             format_prompt=lambda p: format_prompt(tok, p), ref_autocast_bf16=cfg.training.bf16,
                             manifest={"config": key_hash(art.key), "sampler": sampler.name})
    if own:
        sampler.close()
    return score_and_seal(cfg, art, table, log=log, sampler=sampler.name, model=spec)


def score_and_seal(cfg: Config, art: Artefact, table: pd.DataFrame, *, log=print, **record) -> pd.DataFrame:
    """The candidates' ``reward`` (``rewards.reward_model``; kept where the table already has rewards:
    an imported D_t) and ``gold`` (the evaluation reward, where there is one), checked finite; then
    written and sealed."""
    if "reward" not in table or table["reward"].isna().all():
        log(f"scoring {len(table)} candidates with the {cfg.rewards.reward_model} reward")
        table["reward"] = load_reward_model(cfg).score(list(table.prompt), list(table.response))
    gold = load_evaluation_reward(cfg)
    if gold is not None:
        table["gold"] = gold.score(list(table.prompt), list(table.response))
    check_rewards(table, ("reward", "gold", "ref_logp"), f"candidates for {art.path}")
    atomic_write_bytes(art.path, table.to_parquet(index=False))
    art.seal(**record)
    return table


def import_candidates(cfg: Config, art: Artefact, *, log=print) -> pd.DataFrame:
    """Build ``art`` (D_t) from ``data.candidates`` instead of sampling: the train prompts' candidates
    (``sampling.num_prompts`` of them, 0 = all) with their rewards (or ``rewards.reward_model``'s where
    the file has none), the prompt through π_sft's chat template, the responses as token ids (given, or
    the text + EOS: a response in a file is a finished one) and log π_sft, computed once here as for
    sampled candidates. Stage 03 cannot tell the table from a sampled one."""
    from tqdm.auto import tqdm

    from vcb_lib.data import CANDIDATE_COLUMNS, OPTIONAL_COLUMNS, task_of, task_prompts
    from vcb_lib.logps import sequence_logps
    from vcb_lib.models import format_prompt, load_policy, load_tokenizer
    from vcb_lib.user_data import chat_input, load_candidates

    art.invalidate()
    rows = load_candidates(cfg.data, log=log)
    train = [r["prompt_id"] for r in task_prompts(task_of(cfg), "train", cfg.sampling.num_prompts)]
    keep = set(train)
    dropped = {r["prompt_id"] for r in rows} - keep
    if dropped:
        log(f"candidates: {len(dropped)} prompt(s) of {cfg.data.candidates} are not train prompts here "
            f"(test/OOD, not in data.prompts, or past sampling.num_prompts): not trained on")
    order = {pid: i for i, pid in enumerate(train)}
    rows = sorted((r for r in rows if r["prompt_id"] in keep), key=lambda r: (order[r["prompt_id"]], r["k"]))
    spec = artefacts.sft_spec(cfg)
    model = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
    tok = load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
    eos = tok.eos_token_id
    for r in rows:
        r["split"] = "train"  # the task's split decides (data.prompts when given), not the candidate file's own rule
        r["model_input"] = format_prompt(tok, chat_input(r))
        if r["response_ids"] is None:
            r["response_ids"] = list(tok(r["response"], add_special_tokens=False).input_ids) + ([eos] if eos is not None else [])
        r["finish_reason"] = "stop" if r["response_ids"][-1:] == [eos] else "length"
        r["n_tokens"] = len(r["response_ids"])
        r["sampler_logp"] = float("nan")
    chunk = 64
    ref = []
    for start in tqdm(range(0, len(rows), chunk), desc="log π_sft of imported candidates", unit="chunk"):
        part = rows[start:start + chunk]
        ref += sequence_logps(model, tok, [r["model_input"] for r in part], [r["response_ids"] for r in part],
                              autocast_bf16=cfg.training.bf16).tolist()
    table = pd.DataFrame(rows).assign(ref_logp=ref)
    if any(r.get("messages") for r in rows):
        table["messages"] = [json.dumps(r["messages"], ensure_ascii=False) if r.get("messages") else None for r in rows]
    table = table[CANDIDATE_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in table]]
    log(f"candidates: imported {len(table)} candidates of {table.prompt_id.nunique()} prompts from {cfg.data.candidates}")
    return score_and_seal(cfg, art, table, log=log, sampler="imported", model=spec,
                          source=str(cfg.data.candidates))


def generate_candidates(cfg: Config, *, log=print) -> pd.DataFrame:
    """D_t for ``cfg``: the stored table when current, else sampled (resuming from shards),
    reference-scored and rewarded, then sealed."""
    art = artefacts.candidates(cfg)
    state, detail = art.status()
    if state == "current":
        log(f"candidates: up to date in {art.path}")
        return read_candidates(cfg)
    if state == "corrupt":
        log(f"{art.label} is corrupt ({detail}): rebuilding it")
    if cfg.data.candidates:
        return import_candidates(cfg, art, log=log)
    s = cfg.sampling
    return sample_from_sft(cfg, art, "train", s.num_prompts, n=s.n, temperature=s.temperature,
                           max_new_tokens=s.max_new_tokens, seed=cfg.run.seed, top_p=s.top_p, log=log)


def summary(table: pd.DataFrame) -> dict:
    """What the calibration losses will see: sizes, lengths, rewards, σ_r(x) (Eq. 10)."""
    sigma = table.groupby("prompt_id").reward.std(ddof=0)  # population std, as Eq. 10
    out = {"prompts": int(table.prompt_id.nunique()), "candidates": int(len(table)),
           "mean_tokens": float(table.n_tokens.mean()), "stopped": float((table.finish_reason == "stop").mean()),
           "reward_mean": float(table.reward.mean()), "sigma_r_mean": float(sigma.mean())}
    if "gold" in table:
        out["gold_mean"] = float(table.gold.mean())
        out["reward_gold_spearman"] = float(table.reward.rank().corr(table.gold.rank()))
    return out


def run(cfg: Config, *, log=print) -> tuple[pd.DataFrame, dict]:
    """The stage: D_t and its summary (written to ``02_candidates/metrics.json``)."""
    table = generate_candidates(cfg, log=log)
    metrics = summary(table)
    art = Artefact(cfg.stage_dir("02_candidates") / "metrics.json", STAGE, artefacts.candidates(cfg).key)
    write_json(art.path, metrics)
    art.seal()
    return table, metrics
