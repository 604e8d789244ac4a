"""Stage 03 (notebook 03, Sec. 4.3 step 3): train π_sft with each of ``training.methods`` on the
same D_t.

Each method runs as its own process group (``python -m vcb_lib.trainers`` through
``launch.train_subprocess``: ``training.num_processes`` processes under
``training.accelerate_config``), its log streaming into the caller, so peak memory is per
method and a notebook kernel never touches CUDA. Output: ``03_train/<method_dir_name>/``
(log.jsonl, checkpoints/, final/, summary.json), reused while current; an interrupted run
resumes from its last checkpoint. D_t must be current for this config: a stale one is refused.

The on-policy methods (``ppo``, ``rloo``, ``grpo``, ``vcb_online``: ``policy_gradient.OnlineMethod``)
sample their own data in rounds from the policy being trained (``stages.online``, launched the same
way) and land in the same folders. ``03_train/metrics.json`` also records each method's compute:
policy samples drawn, π_sft samples it trained on (D_t), optimizer steps and tokens trained.

``cut`` (judgments instead of reward values, arXiv 2312.14591) trains on the same D_t, each candidate
with the judgment the task's white-box features write (``vcb_lib.judgments``): its folder also holds
``judged.parquet``, the D_t it read. Like every method it is evaluated with the plain instruction
template (the chat template of the prompt alone, ``models.format_prompt``), the paper's inference
setting; with ``training.cut_positive: none`` (default) that is also the context of its Align-P and
Misalign terms.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from vcb_lib.config import Config
from vcb_lib.io import atomic_write_bytes, read_json, write_json
from vcb_lib.losses import LossType
from vcb_lib.policy_gradient import is_online
from vcb_lib.stages import artefacts
from vcb_lib.stages.generate import read_candidates
from vcb_lib.stages.sft_and_reward import start_folder

SUMMARY_KEYS = ("steps", "loss", "tokens/s", "peak_rss_mb", "elapsed")
JUDGED_FILE = "judged.parquet"  # a judgment method's judged D_t, in its folder (artefacts.METHOD_FILES)


def train_method(cfg: Config, method: str, seed: int | None = None, *, log=print) -> dict:
    """One method's training with one training seed (default: the main one), or its stored
    result; returns its ``summary.json``."""
    from vcb_lib.launch import train_subprocess

    seed = artefacts.training_seeds(cfg)[0] if seed is None else seed
    art = artefacts.method(cfg, method, seed)
    if art.current():
        log(f"{method} (seed {seed}): up to date in {art.path}")
        return read_json(art.path / "summary.json")
    art = artefacts.own(cfg, art)
    if is_online(method):  # rounds of rollouts from the policy itself: D_t is not read
        from vcb_lib.stages import online

        start_folder(art, log=log)
        online.train(cfg, method, seed, art, log=log)
        art.seal()
        return read_json(art.path / "summary.json")
    table = read_candidates(cfg)  # refuses a stale, damaged or non-finite D_t before anything is trained on it
    start_folder(art, log=log)
    candidates = artefacts.candidates(cfg).path
    if LossType(method).judged:  # CUT: D_t with each candidate's judgment and the contexts it is scored in
        candidates = judged_candidates(cfg, table, art.path / JUDGED_FILE, log=log)
    # the subprocess reads this resolved config; its run.seed is the training seed (D_t and π_sft are passed by path)
    params = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed)).save(art.path / "params.yaml")
    train_subprocess(params, method, candidates, art.path, model=artefacts.sft_spec(cfg), resume=True, echo=log)
    art.seal()
    return read_json(art.path / "summary.json")


def judged_candidates(cfg: Config, table: pd.DataFrame, path: Path, *, log=print) -> Path:
    """``03_train/<cut folder>/judged.parquet``: D_t with its judgments (``vcb_lib.judgments``: the
    task's white-box ones, or with ``training.cut_judge`` a model's critiques) and the two contexts
    CUT scores each candidate in (``positive_input``: ``training.cut_positive``; ``judged_input``),
    chat-formatted by π_sft's tokenizer. Kept while the folder is (a resumed training reads the same
    judgments)."""
    import contextlib

    from vcb_lib.judgments import judged_candidates as judge_table
    from vcb_lib.models import load_tokenizer

    if path.is_file():
        return path
    tokenizer = load_tokenizer(artefacts.sft_spec(cfg), cache_dir=cfg.models.cache_dir)
    with contextlib.ExitStack() as stack:
        source = judgment_source(cfg, path.parent, stack, log=log)
        judged = judge_table(table, source, tokenizer, positive=cfg.training.cut_positive)
    atomic_write_bytes(path, judged.to_parquet(index=False))
    negative = int((~judged.judgment_positive).sum())
    log(f"judgments ({source.name}): {negative} of {len(judged)} candidates negative -> {path}")
    return path


def judgment_source(cfg: Config, folder: Path, stack, *, log=print):
    """What writes CUT's judgments: the task's white-box features, or with ``training.cut_judge`` an
    OpenAI-compatible model (a URL; its key from ``$VCB_JUDGE_API_KEY`` or ``$OPENAI_API_KEY``), or
    ``local``: vLLM's server on 127.0.0.1 serving ``training.cut_judge_model`` (default the packaged
    SmolLM2) while ``stack`` is open, its replies constrained to end with the verdict line, its log in
    ``folder/judge-server.log``. Requests in flight: ``evaluation.judge_workers``."""
    from vcb_lib import judgments

    t = cfg.training
    if not t.cut_judge:
        try:
            return judgments.judgment_source(artefacts.whitebox_task(cfg))
        except ValueError as err:
            raise ValueError(f"training.methods has cut, which learns from judgments: {err}; or set "
                             "training.cut_judge to have a model write them") from None
    from vcb_lib.judge import LOCAL_JUDGE_MODEL, open_judge

    client, _ = stack.enter_context(open_judge(t.cut_judge, t.cut_judge_model or LOCAL_JUDGE_MODEL,
                                               reply_regex=judgments.LLM_REPLY_REGEX, log_path=folder / "judge-server.log",
                                               cache_dir=cfg.models.cache_dir,
                                               start_timeout=cfg.evaluation.judge_start_timeout, log=log))
    return judgments.LLMJudgments(client, max_workers=cfg.evaluation.judge_workers)


def compute(folder: Path, summary: dict, dt_candidates: int) -> dict:
    """What a trained policy cost: ``policy_samples`` drawn from the policy being trained (online
    methods: rounds × prompts × n), ``sft_samples`` = D_t's size for the offline methods (the π_sft
    samples drawn once for all of them; ``training.max_steps`` may stop before every one is read),
    ``optimizer_steps`` and ``tokens_trained`` (prompt + response tokens through forward and
    backward, from ``log.jsonl``)."""
    log = folder / "log.jsonl"
    rows = pd.read_json(log, lines=True) if log.is_file() and log.stat().st_size else None
    online = "policy_samples" in summary
    return {"policy_samples": int(summary.get("policy_samples", 0)), "sft_samples": 0 if online else dt_candidates,
            "optimizer_steps": int(summary["steps"]), "tokens_trained": int(rows.tokens.sum()) if rows is not None else None}


def logs(cfg: Config) -> pd.DataFrame:
    """Every method's ``log.jsonl`` in one table (``method`` column)."""
    return pd.concat([pd.read_json(artefacts.method(cfg, m).require() / "log.jsonl", lines=True).assign(method=m)
                      for m in cfg.training.methods], ignore_index=True)


def run(cfg: Config, *, log=print) -> dict[str, dict]:
    """The stage: every method × training seed; their summaries by policy name (the method for the
    main seed, ``<method>-seed<k>`` for the others), also written to ``03_train/metrics.json``."""
    artefacts.candidates(cfg).require()  # a stale or damaged D_t is reported even when every method is current
    summaries = {artefacts.replicate(cfg, m, seed): train_method(cfg, m, seed, log=log)
                 for m in cfg.training.methods for seed in artefacts.training_seeds(cfg)}
    dt = len(read_candidates(cfg))
    folders = {artefacts.replicate(cfg, m, seed): artefacts.method(cfg, m, seed).path
               for m in cfg.training.methods for seed in artefacts.training_seeds(cfg)}
    metrics = {m: {k: s[k] for k in SUMMARY_KEYS if k in s} | {"final_dir": s["final_dir"], "compute": compute(folders[m], s, dt)}
               for m, s in summaries.items()}
    write_json(cfg.stage_dir("03_train") / "metrics.json", metrics)
    return summaries
