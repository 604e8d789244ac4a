"""Stage 01 (notebook 01, Sec. 4.3 step 1): preference pairs, π_sft, the reward model (Eq. 18)
and its held-out accuracy (Table 4).

Writes ``01_models/pairs.parquet``, ``01_models/sft/`` (when ``models.sft`` is on),
``01_models/reward_model/`` (when ``rewards.reward_model`` is ``learned``) and
``01_models/metrics.json``; each is reused while current (``vcb_lib.manifest``).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from vcb_lib import manifest
from vcb_lib.config import Config
from vcb_lib.data import task_of
from vcb_lib.io import atomic_write_bytes, read_json, write_json
from vcb_lib.stages import artefacts

STAGE = "01_sft_and_reward"


def preference_pairs(cfg: Config, *, log=print) -> pd.DataFrame:
    """Preference pairs for the SFT targets and the reward model, one per prompt.

    Embedded tasks: two responses per train prompt sampled from ``models.policy`` and labelled by
    the gold reward (ties dropped). The paper's tasks: the dataset's human pairs. Columns:
    prompt_id, prompt, chosen, rejected, gold_chosen, gold_rejected, split ("train" | "heldout",
    the ``rewards.rm_heldout`` share with the smallest stable hash of the prompt id).
    """
    from vcb_lib.data import _stable_hash, build_candidates, load_hub_preferences, task_prompts
    from vcb_lib.models import format_prompt, load_policy, load_tokenizer
    from vcb_lib.samplers import make_sampler

    art = artefacts.pairs(cfg)
    if art.current():
        return pd.read_parquet(art.path)
    out = cfg.stage_dir("01_models")
    task = task_of(cfg)
    if task.source == "hub":
        rows = load_hub_preferences(task.preferences, "train", limit=cfg.rewards.rm_prompts or None)
        pairs = pd.DataFrame(rows).assign(prompt_id=lambda d: [f"pair-{i}" for i in range(len(d))],
                                          gold_chosen=np.nan, gold_rejected=np.nan)
    else:
        prompts = task_prompts(task, "train", cfg.rewards.rm_prompts)
        spec = cfg.models.policy
        model, tok = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir), load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
        sampler = make_sampler(cfg.sampling.backend, spec, model=model, tokenizer=tok, batch_size=cfg.sampling.batch_size,
                               seed=cfg.run.seed, cache_dir=cfg.models.cache_dir, log=log)
        table = build_candidates(prompts, sampler, out / "rm_samples", n=2, temperature=cfg.sampling.temperature,
                                 max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.run.seed + 1, top_p=cfg.sampling.top_p,
                                 format_prompt=lambda p: format_prompt(tok, p), manifest={"config": manifest.key_hash(art.key)})
        sampler.close()
        table["gold"] = load_evaluation_reward(cfg).score(list(table.prompt), list(table.response))
        wide = table.pivot(index="prompt_id", columns="k", values=["prompt", "response", "gold"])
        first_wins = wide[("gold", 0)] > wide[("gold", 1)]
        pairs = pd.DataFrame({
            "prompt_id": wide.index, "prompt": wide[("prompt", 0)].values,
            "chosen": np.where(first_wins, wide[("response", 0)], wide[("response", 1)]),
            "rejected": np.where(first_wins, wide[("response", 1)], wide[("response", 0)]),
            "gold_chosen": np.where(first_wins, wide[("gold", 0)], wide[("gold", 1)]).astype(float),
            "gold_rejected": np.where(first_wins, wide[("gold", 1)], wide[("gold", 0)]).astype(float),
        })
        pairs = pairs[pairs.gold_chosen != pairs.gold_rejected].reset_index(drop=True)  # ties carry no preference
    # Hold out the ceil(rm_heldout · N) pairs with the smallest stable hash (>= 1 when N >= 2).
    rank = pd.Series([_stable_hash(f"rm|{pid}") for pid in pairs.prompt_id]).rank(method="first").to_numpy()
    n_held = min(max(int(np.ceil(cfg.rewards.rm_heldout * len(pairs))), 1), len(pairs) - 1) if len(pairs) >= 2 else 0
    pairs["split"] = np.where(rank <= n_held, "heldout", "train")
    atomic_write_bytes(art.path, pairs.to_parquet(index=False))
    art.seal()
    log(f"preference pairs: {int((pairs.split == 'train').sum())} train, {int((pairs.split == 'heldout').sum())} held out")
    return pairs


def start_folder(art: manifest.Artefact, *, log=print) -> None:
    """Before a Trainer builds a folder artefact: keep its checkpoints when they were started for
    this same config (the run resumes), else clear it (another config's work, or damaged)."""
    state, detail = art.status()
    if state == "corrupt":
        log(f"{art.label} is corrupt ({detail}): rebuilding it")
    if state == "corrupt" or not art.resumable():
        manifest.remove(art.path)
    art.begin()


def train_sft(cfg: Config, pairs: pd.DataFrame, *, log=print) -> Path | None:
    """MLE of ``models.policy`` on the SFT targets (``LossType.SFT``), saved to ``01_models/sft``.

    Targets: the dataset's references for the paper's tasks; for the exact task, responses drawn
    from its known target π_target (``vcb_lib.tasks.exact.sft_targets``); else the chosen
    (gold-preferred) response of each train pair in ``pairs``. Returns None when ``models.sft`` is off
    (``models.policy`` is π_sft)."""
    from vcb_lib.data import task_prompts
    from vcb_lib.losses import LossType
    from vcb_lib.models import load_policy, load_tokenizer
    from vcb_lib.trainers import Trainer, sft_groups

    if not cfg.models.sft:
        log(f"SFT: off (models.sft: false), π_sft = {cfg.models.policy}")
        return None
    art = artefacts.sft(cfg)
    if art.current():
        log(f"SFT: up to date in {art.path}")
        return art.path
    start_folder(art, log=log)
    spec = cfg.models.policy
    model = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
    tok = load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
    task = task_of(cfg)
    if task.source == "hub":
        rows = task_prompts(task, "train", cfg.sampling.num_prompts)
        groups = sft_groups(tok, [r["prompt"] for r in rows], [r["reference"] for r in rows], [r["prompt_id"] for r in rows])
    elif task.exact:  # the task's known target π_target: sft_samples responses of L tokens per train prompt drawn from it
        from vcb_lib.tasks.exact import sft_targets

        groups = sft_groups(tok, *sft_targets(task_prompts(task, "train", cfg.sampling.num_prompts),
                                              cfg.sampling.max_new_tokens))
    else:
        train = pairs[pairs.split == "train"]
        groups = sft_groups(tok, list(train.prompt), list(train.chosen), list(train.prompt_id))
    sft_cfg = dataclasses.replace(cfg.training, learning_rate=cfg.models.sft_learning_rate, epochs=cfg.models.sft_epochs,
                                  max_steps=0, save_every=0)
    trainer = Trainer(model.train(), tok, groups, LossType.SFT, sft_cfg, art.path / "training", seed=cfg.run.seed,
                      max_length=cfg.models.max_prompt_tokens + cfg.sampling.max_new_tokens)
    summary = trainer.train(resume=True)
    for f in Path(summary["final_dir"]).iterdir():  # the model folder itself is what sft_spec names
        shutil.copy2(f, art.path / f.name)
    art.seal(steps=summary["steps"])
    log(f"SFT: {summary['steps']} steps on {len(groups)} targets, final loss {summary['loss']} -> {art.path}")
    return art.path


def train_reward_model(cfg: Config, pairs: pd.DataFrame, *, log=print):
    """Eq. 18 on the train pairs: a scalar head on the policy backbone (or ``rewards.rm_backbone``),
    trained by the one ``Trainer`` with ``LossType.BT``, saved to ``01_models/reward_model/``."""
    from vcb_lib.rewards import LearnedRewardModel, reward_model_backbone
    from vcb_lib.trainers import Trainer, reward_scores

    art = artefacts.reward_model(cfg)
    if art.current():
        log(f"reward model: up to date in {art.path}")
        return LearnedRewardModel.load(art.path)
    start_folder(art, log=log)
    backbone = cfg.models.policy if cfg.rewards.rm_backbone == "policy" else cfg.rewards.rm_backbone
    model, tok = reward_model_backbone(backbone, cache_dir=cfg.models.cache_dir)
    rm = LearnedRewardModel(model, tok)
    train = pairs[pairs.split == "train"]
    if train.empty:
        raise ValueError("no training pairs for the reward model (all held out or tied): raise rewards.rm_prompts")
    rm_cfg = dataclasses.replace(cfg.training, learning_rate=cfg.rewards.rm_learning_rate, epochs=cfg.rewards.rm_epochs,
                                 max_steps=0, save_every=0, warmup_steps=min(cfg.training.warmup_steps, 5))
    trainer = Trainer(model.train(), tok, rm.groups(list(train.prompt), list(train.chosen), list(train.rejected)),
                      "bt", rm_cfg, art.path / "training", seed=cfg.run.seed, score_fn=reward_scores,
                      max_length=cfg.models.max_prompt_tokens + cfg.sampling.max_new_tokens)
    summary = trainer.train(resume=True)
    rm = LearnedRewardModel(trainer.accelerator.unwrap_model(trainer.model), tok)
    rm.save(art.path)
    art.seal(steps=summary.get("steps"))
    log(f"reward model: trained {summary.get('steps', '?')} steps -> {art.path}")
    return rm


def load_reward(cfg: Config, spec: str):
    """The reward ``spec`` names: "gold" (the evaluation reward, :func:`load_evaluation_reward`),
    "learned" (this run's stage-01 Bradley-Terry model, checked), or a reward spec
    (``vcb_lib.reward_sources``: a callable, a judge, a sequence-classifier folder or hub id)."""
    from vcb_lib import reward_sources
    from vcb_lib.rewards import LearnedRewardModel

    if spec == "gold":
        gold = load_evaluation_reward(cfg)
        if gold is None:
            raise ValueError(f"task {task_of(cfg).name!r} has no gold reward: set rewards.evaluation")
        return gold
    if spec == "learned":
        return LearnedRewardModel.load(artefacts.reward_model(cfg).require())
    return reward_sources.load(spec, model=cfg.rewards.judge_model, rubric=cfg.rewards.judge_rubric,
                               cache_dir=cfg.models.cache_dir, log_dir=cfg.run_dir)


def load_reward_model(cfg: Config):
    """What scores D_t: ``rewards.reward_model`` (:func:`load_reward`)."""
    return load_reward(cfg, cfg.rewards.reward_model)


def load_evaluation_reward(cfg: Config):
    """The evaluation ("gold") reward: ``rewards.evaluation`` when set, else the task's gold reward;
    None when there is neither (a hub task, your own data without one): the D_t reward then evaluates."""
    from vcb_lib.rewards import gold_reward

    if cfg.rewards.evaluation:
        return load_reward(cfg, cfg.rewards.evaluation)
    task = task_of(cfg)
    return gold_reward(task.name) if task.gold else None


def has_evaluation_reward(cfg: Config) -> bool:
    """Whether candidates get a ``gold`` column (:func:`load_evaluation_reward` is not None)."""
    return bool(cfg.rewards.evaluation) or bool(task_of(cfg).gold)


def evaluation_reward_name(cfg: Config) -> str:
    """The evaluation reward in words, as reports name it."""
    if cfg.rewards.evaluation:
        return f"`{cfg.rewards.evaluation}` reward"
    task = task_of(cfg)
    return task.reward_name if task.gold else f"{cfg.rewards.reward_model} reward model"


def evaluate_reward_model(rm, pairs: pd.DataFrame) -> dict:
    """Held-out pair accuracy (Table 4) and, where the pairs carry gold rewards, agreement with
    the gold reward: Pearson/Spearman correlation over the held-out responses."""
    held = pairs[pairs.split == "heldout"]
    if held.empty:
        raise ValueError("no held-out pairs to measure the reward model on: raise rewards.rm_prompts or rm_heldout")
    chosen, rejected = rm.score(list(held.prompt), list(held.chosen)), rm.score(list(held.prompt), list(held.rejected))
    result = {"accuracy": float(np.mean(chosen > rejected)), "heldout_pairs": int(len(held)),
              "train_pairs": int((pairs.split == "train").sum())}
    if held.gold_chosen.notna().all():
        learned = np.concatenate([chosen, rejected])
        gold = np.concatenate([held.gold_chosen, held.gold_rejected])
        result["pearson_gold"] = float(np.corrcoef(learned, gold)[0, 1])
        ranks = lambda x: pd.Series(x).rank().to_numpy()  # noqa: E731  (Spearman = Pearson of ranks)
        result["spearman_gold"] = float(np.corrcoef(ranks(learned), ranks(gold))[0, 1])
        result["scores"] = {"learned": learned.tolist(), "gold": gold.tolist()}
    return result


def metrics_artefact(cfg: Config) -> manifest.Artefact:
    return manifest.Artefact(cfg.stage_dir("01_models", create=False) / "metrics.json", STAGE,
                             artefacts.upstream(cfg))


def run(cfg: Config, *, log=print) -> dict:
    """The whole stage: pairs, π_sft, the reward model (trained when ``learned``) and its
    accuracy, whatever ``rewards.reward_model`` is (with the gold reward and no SFT nothing needs
    pairs: ``pairs`` is None, the accuracy None). Returns ``{"pairs", "sft", "reward_model",
    "metrics"}``; ``metrics`` (written to ``01_models/metrics.json``) has the accuracy, its
    ``scores`` (learned vs gold) only in the returned dict."""
    no_labels = task_of(cfg).source == "data" and not has_evaluation_reward(cfg)  # nothing could label pairs
    oracle = cfg.rewards.reward_model in ("gold", cfg.rewards.evaluation)  # the evaluation reward scores D_t itself
    if not cfg.models.sft and (oracle or no_labels):  # nothing here needs pairs: skip sampling them
        log(f"stage 01: π_sft = {cfg.models.policy} (models.sft off) and the {cfg.rewards.reward_model} reward scores D_t: "
            "no pairs, no reward model")
        pairs, sft_dir, rm = None, None, load_reward_model(cfg)
        result = {"accuracy": None, "heldout_pairs": 0, "train_pairs": 0}
    else:
        pairs = preference_pairs(cfg, log=log)
        sft_dir = train_sft(cfg, pairs, log=log)
        rm = train_reward_model(cfg, pairs, log=log) if cfg.rewards.reward_model == "learned" else load_reward_model(cfg)
        result = evaluate_reward_model(rm, pairs)
    metrics = {k: v for k, v in result.items() if k != "scores"} | {
        "reward_model": cfg.rewards.reward_model, "sft": str(sft_dir or cfg.models.policy)}
    art = metrics_artefact(cfg)
    write_json(art.path, metrics)
    art.seal()
    return {"pairs": pairs, "sft": sft_dir, "reward_model": rm, "metrics": metrics | {"scores": result.get("scores")}}


def read_metrics(cfg: Config) -> dict:
    """Stage 01's numbers (the reward model's accuracy), checked."""
    return read_json(metrics_artefact(cfg).require())
