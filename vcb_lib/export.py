"""A run's data for trainers outside the workbench (TRL, OpenRLHF, verl):
``python -m vcb_lib export RUN --format hf|trl-pairs|trl-groups [--pairs all|best_worst] [--out DIR]``.

RUN is a run folder (``outputs/default``: its ``config.yaml`` says how the run was built) or a params
file. D_t is read through stage 02's reader (``stages.generate.read_candidates``): a D_t that is stale
for that config, damaged or not finite is refused naming the stage to rerun, never exported. Each
format is a folder (default ``<run>/export/<format>/``) with a dataset card ``README.md``: the task,
the sampling parameters, the reward that scored D_t, the reference log-probs, the config slice D_t
was built from and its sha256.

- ``hf``: a ``datasets.DatasetDict`` (``save_to_disk``; read it with ``datasets.load_from_disk(DIR)``).
  ``train`` is D_t as stored: one row per candidate, every column (``reward`` = what the losses
  train on, ``gold``, ``ref_logp`` = log π_sft of the response, ``response_ids``, ...).
  ``evaluation``, when stage 04 built them: every policy's evaluation samples (``method`` names the
  policy, ``policy_logp`` its log π, ``ref_logp`` log π_sft). Samples that exist but are stale or
  damaged are refused like D_t; the card lists those never built.
- ``trl-pairs``: preference rows for TRL's ``DPOTrainer``: ``prompt``, ``chosen``, ``rejected``
  (``score_chosen`` / ``score_rejected`` their rewards, ``chosen_k`` / ``rejected_k`` their D_t rows),
  pairs formed as the order-based losses form them (``losses._pair_mask``): ``all`` (every pair with
  r_w > r_l) or ``best_worst`` (one per prompt); ties never form a pair. Default: the run's
  ``training.pairs``.
- ``trl-groups``: one row per prompt: ``prompt``, its n ``completions`` with their ``rewards`` and
  ``ref_logps`` (and ``gold``): the prompt column TRL's group trainers (GRPOTrainer, RLOOTrainer) read,
  their other columns reaching reward functions as keyword arguments.

Both TRL formats are one ``train.parquet`` (``datasets.load_dataset(DIR, split="train")`` through the
card's ``configs``). A prompt that went through a chat template (``model_input`` differs from
``prompt``) is written in TRL's conversational format (``[{"role": "user", "content": ...}]``,
completions as assistant messages), so TRL applies the chat template as the workbench did; otherwise
prompts and completions are plain text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from vcb_lib.config import Config, _yaml, load_params
from vcb_lib.stages import artefacts
from vcb_lib.stages.generate import check_rewards, read_candidates
from vcb_lib.data import task_of

FORMATS = ("hf", "trl-pairs", "trl-groups")
PAIRS = ("all", "best_worst")  # training.pairs' values: how order-based losses pair candidates
CARD = "README.md"
EXPORT_KEY = "vcb_export"  # the card's front-matter key that marks a folder as an export (replaced on rerun)


class ExportError(ValueError):
    """Bad export input: an unknown format or pairing, no run, D_t that cannot be exported, or an
    output folder that holds something other than an earlier export."""


def run_config(run: str | os.PathLike, *, log: Callable[[str], None] = print) -> Config:
    """The config of a run folder (its ``config.yaml``, placed where the folder is now) or of a params
    file. Keys of a run's config.yaml that this version no longer has are left out, named in the log:
    whether D_t is still current is its manifest's call (``read_candidates``), not theirs."""
    path = Path(run).expanduser().resolve()
    if path.is_file():
        return load_params(path)
    if not path.is_dir():
        raise ExportError(f"{path} does not exist: give a run folder (e.g. outputs/default) or a params file")
    saved = path / "config.yaml"
    if not saved.is_file():
        raise ExportError(f"{path} holds no config.yaml: not a run folder (python -m vcb_lib run writes one); "
                          "give a run folder such as outputs/default, or a params file")
    known = Config().to_dict()
    values = {f"{section}.{key}": value for section, keys in (_yaml(saved.read_text()) or {}).items()
              for key, value in (keys or {}).items()}
    gone = sorted(k for k in values if k.partition(".")[2] not in known.get(k.partition(".")[0], {}))
    if gone:
        log(f"{saved}: ignoring key(s) this version does not have: {', '.join(gone)}")
    values = {k: v for k, v in values.items() if k not in gone} | {"run.output_root": str(path.parent), "run.name": path.name}
    return dataclasses.replace(load_params(None, values), source=str(saved))


def candidates(cfg: Config) -> pd.DataFrame:
    """D_t, checked by stage 02's reader; an ArtefactError (stale, damaged, not built) passes through."""
    try:
        return read_candidates(cfg)
    except ValueError as err:  # non-finite rewards or reference log-probs
        raise ExportError(f"D_t cannot be exported: {err}") from None


def evaluation_samples(cfg: Config) -> tuple[pd.DataFrame | None, list[str]]:
    """Every policy's stored evaluation samples (``sft`` and each method, test and OOD prompts) and
    the ``policy/split`` names never built. Stale or damaged ones raise ArtefactError."""
    tables, missing = [], []
    for policy in ["sft", *cfg.training.methods]:
        for split in ("test", "ood"):
            art = artefacts.samples(cfg, policy, split)
            if art.status()[0] == "missing":
                missing.append(f"{policy}/{split}")
                continue
            table = pd.read_parquet(art.require())
            try:
                tables.append(check_rewards(table, ("reward", "gold"), str(art.path)))
            except ValueError as err:
                raise ExportError(f"evaluation samples cannot be exported: {err}") from None
    return (pd.concat(tables, ignore_index=True) if tables else None), missing


# --------------------------------------------------------------------------------------------
# TRL's shapes
# --------------------------------------------------------------------------------------------


def is_chat(table: pd.DataFrame) -> bool:
    """Whether D_t's prompts went through a chat template (then TRL gets conversational rows)."""
    return bool((table["model_input"] != table["prompt"]).any())


def _prompt(text: str, chat: bool, messages: Any = None) -> Any:
    """TRL's prompt: text, or the conversation as the model saw it (your data's system turn included)."""
    if chat and isinstance(messages, str) and messages:
        return json.loads(messages)
    return [{"role": "user", "content": text}] if chat else text


def _completion(text: str, chat: bool) -> Any:
    return [{"role": "assistant", "content": text}] if chat else text


def _groups(table: pd.DataFrame) -> list[pd.DataFrame]:
    """D_t's prompts in table order, each with its candidates in ``k`` order (as the trainer groups them)."""
    return [rows.sort_values("k") for _, rows in table.groupby("prompt_id", sort=False)]


def preference_pairs(table: pd.DataFrame, pairs: str) -> pd.DataFrame:
    """``trl-pairs`` rows: the (chosen, rejected) pairs the order-based losses train on, by
    ``losses._pair_mask`` on D_t's ``reward``; prompts in table order, pairs in (w, l) index order."""
    import torch

    from vcb_lib.losses import _pair_mask

    groups, chat = _groups(table), is_chat(table)
    n = max(len(g) for g in groups)
    rewards = torch.zeros(len(groups), n, dtype=torch.float64)  # (G, n)
    mask = torch.zeros(len(groups), n, dtype=torch.bool)  # (G, n)
    for i, g in enumerate(groups):
        rewards[i, :len(g)] = torch.tensor(g["reward"].astype(float).tolist(), dtype=torch.float64)
        mask[i, :len(g)] = True
    rows = []
    for i, w, l in _pair_mask(rewards, mask, pairs).nonzero().tolist():  # (G, n, n) -> (P, 3)
        a, b = groups[i].iloc[w], groups[i].iloc[l]
        rows.append({"prompt_id": str(a.prompt_id), "prompt": _prompt(a.prompt, chat, a.get("messages")),
                     "chosen": _completion(a.response, chat), "rejected": _completion(b.response, chat),
                     "score_chosen": float(a.reward), "score_rejected": float(b.reward),
                     "chosen_k": int(a.k), "rejected_k": int(b.k)})
    return pd.DataFrame(rows, columns=["prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                                       "chosen_k", "rejected_k"])


def prompt_groups(table: pd.DataFrame) -> pd.DataFrame:
    """``trl-groups`` rows: one per prompt, its candidates in ``k`` order as lists."""
    chat = is_chat(table)
    rows = []
    for g in _groups(table):
        row = {"prompt_id": str(g.prompt_id.iloc[0]), "prompt": _prompt(g.prompt.iloc[0], chat,
                                                                       g["messages"].iloc[0] if "messages" in g else None),
               "completions": [_completion(r, chat) for r in g.response], "rewards": g.reward.astype(float).tolist(),
               "ref_logps": g.ref_logp.astype(float).tolist()}
        if "response_ids" in g:  # the tokens the losses trained on: an import reads them back exactly
            row["completion_ids"] = [[int(t) for t in ids] for ids in g.response_ids]
        if "gold" in g:
            row["gold"] = g.gold.astype(float).tolist()
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The dataset card
# --------------------------------------------------------------------------------------------


def reward_source(cfg: Config) -> str:
    """Which reward scored D_t (``rewards.reward_model``), in words."""
    from vcb_lib.reward_sources import kind
    from vcb_lib.stages.sft_and_reward import evaluation_reward_name

    rm = cfg.rewards.reward_model
    if cfg.data.candidates:
        return f"the rewards of the imported candidates `{cfg.data.candidates}` (or `{rm}` where it had none)"
    if rm == "gold":
        which = "the evaluation reward" if cfg.rewards.evaluation else "the task's gold reward"
        return f"{which}, {evaluation_reward_name(cfg)} (`rewards.reward_model: gold`)"
    if rm == "learned":
        return (f"the Bradley-Terry reward model (Eq. 18) trained in stage 01 on gold-labelled pairs, backbone "
                f"`{cfg.rewards.rm_backbone}` (`01_models/reward_model/`)")
    return {"callable": f"the Python function `{rm}`", "judge": f"an LLM judge with a rubric (`{rm}`, model "
            f"`{cfg.rewards.judge_model}`)"}.get(kind(rm), f"the sequence-classification reward model `{rm}`")


def _columns(fmt: str, chat: bool, gold: bool) -> list[str]:
    text = "a list of messages (`role`, `content`)" if chat else "text"
    if fmt == "hf":
        return ["`train` (D_t, one row per candidate): `prompt_id`, `split`, `prompt` (task text), `model_input` "
                "(the prompt as π_sft saw it, chat template applied), `k` (0..n-1), `response`, `response_ids` (the "
                "sampled tokens; training uses these, never a re-tokenisation of the text), `n_tokens`, "
                "`finish_reason`, `ref_logp`, `sampler_logp` (the sampler's own log-prob), `reward`"
                + (", `gold`" if gold else ""),
                "`evaluation` (when stage 04 built it): every policy's samples on the test and OOD prompts; `method` "
                "names the policy (`sft` = π_sft), `policy_logp` its log π, `ref_logp` log π_sft, `reward`, `gold`"]
    if fmt == "trl-pairs":
        return [f"`prompt`, `chosen`, `rejected`: {text} (TRL `DPOTrainer`'s preference columns)",
                "`score_chosen`, `score_rejected`: their `reward`; `chosen_k`, `rejected_k`: their `k` in D_t; "
                "`prompt_id`"]
    return [f"`prompt`: {text} (the column TRL's `GRPOTrainer` / `RLOOTrainer` read; other columns reach their "
            "reward functions as keyword arguments)",
            f"`completions`: the prompt's n candidates in `k` order, each {text}; `rewards`, `ref_logps`"
            + (", `gold`" if gold else "") + ": one value per completion; `completion_ids`: their token ids; `prompt_id`"]


def dataset_card(cfg: Config, fmt: str, record: dict, info: dict, chat: bool, gold: bool) -> str:
    """``README.md`` of an export: front matter (``configs`` for ``load_dataset``, ``vcb_export``) and
    what a reader needs to use the data without this workbench."""
    from vcb_lib.stages.sft_and_reward import evaluation_reward_name

    task, s = task_of(cfg), cfg.sampling
    meta: dict[str, Any] = {"tags": ["vcb", "preference", "rlhf"], "pretty_name": f"VCB D_t of run {cfg.run.name}"}
    if fmt != "hf":
        meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": "train.parquet"}]}]
    meta[EXPORT_KEY] = info
    files = record.get("files") or {}
    digest = next(iter(files.values()), {}).get("sha256", "?")
    load = ('from datasets import load_from_disk\nds = load_from_disk("<this folder>")  # ds["train"], ds.get("evaluation")'
            if fmt == "hf" else 'from datasets import load_dataset\nds = load_dataset("<this folder>", split="train")')
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# D_t of VCB run `{cfg.run.name}` ({fmt})", "",
        f"Candidates sampled from π_sft and scored by a reward, exported by `python -m vcb_lib export` "
        f"({info['rows']} rows). Value-based CaliBration (VCB, arXiv 2402.16030) trains on the reward values of "
        f"n candidates per prompt; order-based losses (DPO, IPO, SLiC, RRHF) on their pairs.", "",
        "## Task", "",
        f"`{task.name}` ({task.source}"
        + (f", prompts from `{task.prompts}`" if task.prompts else f", your data `{task.data.prompts or task.data.candidates}`"
           if task.source == "data" else ", the workbench's embedded prompt set")
        + f"): {info['prompts']} train prompts; evaluation reward: {evaluation_reward_name(cfg)}.", "",
        "## Sampling", "",
        f"- π_sft: `{record.get('model', cfg.models.policy)}` ({cfg.models.dtype}), sampler `{record.get('sampler', '?')}`",
        f"- n = {s.n} candidates per prompt, temperature {s.temperature}, top_p {s.top_p}, "
        f"max_new_tokens {s.max_new_tokens}, seed {cfg.run.seed}",
        f"- prompts: {'chat template applied (`model_input`)' if chat else 'plain text, no chat template'}", "",
        "## Rewards", "",
        f"- `reward` (what the losses train on): {reward_source(cfg)}",
        *([f"- `gold`: {evaluation_reward_name(cfg)}"] if gold else []), "",
        "## Reference log-probs", "",
        "`ref_logp` (`ref_logps` in trl-groups) is log π_sft(y | x) summed over the response tokens "
        "(`response_ids` after `model_input`), computed once when D_t was built, with the π_sft above"
        + (" under bf16 autocast" if cfg.training.bf16 else "") + ". VCB and DPO-style losses read it instead "
        "of running a reference model; a trainer with another tokenizer or template must recompute it.", "",
        "## Columns", "", *[f"- {c}" for c in _columns(fmt, chat, gold)], "",
        *([f"Pairs: `{info['pairs']}` (as the workbench's order-based losses form them: "
           + ("every pair with r_w > r_l" if info["pairs"] == "all" else "the best and the worst candidate of each prompt")
           + "; tied rewards never form a pair). TRL appends EOS (or the end of turn) to every completion, also to "
             "those D_t cut at max_new_tokens.", ""] if fmt == "trl-pairs" else []),
        *([f"Evaluation samples not built (stage 04): {', '.join(info['samples_missing'])}.", ""]
          if info.get("samples_missing") else []),
        "## Loading", "", "```python", load, "```", "",
        "## Provenance", "",
        f"`02_candidates/candidates.parquet`, sha256 `{digest}`, built by stage `{record.get('stage', '?')}` from this "
        "config slice (`vcb_lib/stages/artefacts.py`):", "",
        "```yaml", yaml.safe_dump(record.get("key", {}), sort_keys=True, allow_unicode=True).rstrip(), "```", "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _check_target(out: Path) -> None:
    """``out`` may be new, empty, or an earlier export (replaced); anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} is a file: give --out a folder")
    if not any(out.iterdir()):
        return
    try:
        front = (out / CARD).read_text().split("---")[1]
        if EXPORT_KEY in (yaml.safe_load(front) or {}):
            return
    except (OSError, IndexError, yaml.YAMLError, AttributeError):
        pass
    raise ExportError(f"{out} holds files that are not an earlier export: choose another --out or remove it")


def export_run(run: str | os.PathLike | Config, fmt: str, out: str | os.PathLike | None = None, *,
               pairs: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Export a run's D_t (and, for ``hf``, its evaluation samples) as ``fmt``; returns the folder.
    ``pairs`` (trl-pairs): ``all`` or ``best_worst``, default the run's ``training.pairs``."""
    from vcb_lib.io import atomic_write_bytes, atomic_write_text, replace_folder

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    cfg = run if isinstance(run, Config) else run_config(run, log=log)
    pairs = pairs or cfg.training.pairs
    if pairs not in PAIRS:
        raise ExportError(f"unknown pairing {pairs!r}; allowed: {', '.join(PAIRS)}")
    table = candidates(cfg)
    record = artefacts.candidates(cfg).manifest() or {}
    out = Path(out).expanduser().resolve() if out is not None else cfg.run_dir / "export" / fmt
    _check_target(out)
    chat, gold = is_chat(table), "gold" in table
    info: dict[str, Any] = {"format": fmt, "run": str(cfg.run_dir), "prompts": int(table.prompt_id.nunique()),
                            "candidates_sha256": next(iter((record.get("files") or {}).values()), {}).get("sha256")}
    if fmt == "hf":
        from datasets import Dataset, DatasetDict

        samples, missing = evaluation_samples(cfg)
        splits = {"train": Dataset.from_pandas(table, preserve_index=False)}
        if samples is not None:
            splits["evaluation"] = Dataset.from_pandas(samples, preserve_index=False)
        data = DatasetDict(splits)
        info |= {"rows": len(table), "evaluation_rows": 0 if samples is None else len(samples), "samples_missing": missing}
    else:
        data = preference_pairs(table, pairs) if fmt == "trl-pairs" else prompt_groups(table)
        if data.empty:
            raise ExportError(f"D_t forms no {pairs} pairs: every prompt's candidates have tied rewards")
        info |= {"rows": len(data)} | ({"pairs": pairs} if fmt == "trl-pairs" else {})
    tmp = out.with_name(f".tmp-{out.name}")  # written whole, then renamed over an earlier export
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if fmt == "hf":
        data.save_to_disk(str(tmp))
    else:
        atomic_write_bytes(tmp / "train.parquet", data.to_parquet(index=False))
    atomic_write_text(tmp / CARD, dataset_card(cfg, fmt, record, info, chat, gold))
    replace_folder(tmp, out)
    log(f"exported {info['rows']} {'candidates' if fmt == 'hf' else 'pairs' if fmt == 'trl-pairs' else 'prompts'} "
        f"of {cfg.run_dir} as {fmt} -> {out}")
    return out
