"""Prompt sets: the two embedded tasks and the paper's hub datasets.

Embedded tasks (offline, written for this project, package data under ``vcb_lib/tasks/``):

- ``sentiment``: controlled sentiment generation (the DPO paper's classic setting, as
  instructions): "Write a short review of the film 'Jaws'.". Gold reward: VADER compound.
- ``assistant``: helpful answers to everyday instructions (cooking, travel, study, health,
  household, tech, definitions, lists, short poems). Each prompt carries a ``qtype``
  (``short_fact``, ``explain``, ``howto``, ``list``, ``creative``) that the gold reward's
  length term reads.

Each task has a fixed train/test split (~80/20) and an out-of-distribution (OOD) set with other
subjects and phrasing (the embedded analogue of the paper's Table 5, TL;DR -> CNN/DailyMail).
Prompts are built from templates x items (see the JSON files). The split is decided per item,
stratified per group: in each group (a sentiment category, an assistant qtype) the 20% of items
with the smallest stable hash of ``task|item`` are test (:func:`_test_items`), so every prompt
about one subject shares a split and each group is in both splits.

Rows of :func:`load_prompts` are dicts::

    {"prompt_id": "assistant-3f2a9c01d4",   # stable: a hash of task + prompt text
     "prompt": "How do I cook rice on the stove?",
     "split": "train",                      # "train" | "test" | "ood"
     "task": "assistant",
     "subject": "cook rice on the stove",   # the item the template was filled with
     "qtype": "howto", "topic": "cooking"}  # task meta (sentiment: "category")

Hub datasets (the paper's settings; need the hub or local files in the same schema):
:func:`load_hub_prompts` and :func:`load_hub_preferences` over :data:`HUB_DATASETS`
(Anthropic/hh-rlhf, CarperAI/openai_summarize_tldr, CarperAI/openai_summarize_comparisons,
abisee/cnn_dailymail).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from vcb_lib.tasks import TASKS, Task, get_task

EMBEDDED_TASKS = tuple(name for name, t in TASKS.items() if t.source == "embedded")
SPLITS = ("train", "test", "ood", "all")
TEST_PERCENT = 30  # share of each group's in-distribution items (not prompts) held out for test
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = [
    "EMBEDDED_TASKS",
    "SPLITS",
    "TASKS_DIR",
    "load_prompts",
    "HUB_DATASETS",
    "HubDataset",
    "load_hub_prompts",
    "load_hub_preferences",
    "split_hh_dialogue",
    "MalformedRow",
    "CandidateGroup",
    "candidate_groups",
    "collate_groups",
]


# --------------------------------------------------------------------------------------------
# Embedded tasks
# --------------------------------------------------------------------------------------------


def _check_choice(kind: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _test_items(task: str, items: list[str]) -> set[str]:
    """The test items of one group: the TEST_PERCENT% with the smallest stable hash (rounded).

    Stratified per group (category / qtype) so every group is in both splits in proportion;
    deterministic (a hash rank, never a random generator).
    """
    ranked = sorted(items, key=lambda item: _stable_hash(f"{task}|{item}"))
    return set(ranked[: round(len(items) * TEST_PERCENT / 100)])


def _expand(task: str, groups: list[dict], split: str | None) -> list[dict]:
    """Templates x items -> rows. Item i of a group uses templates i, i+1, ..., i+per_item-1 (mod T)."""
    rows = []
    for group in groups:
        templates, per_item = group["templates"], group["per_item"]
        subjects = [item if isinstance(item, str) else item["x"] for item in group["items"]]
        test = _test_items(task, subjects)
        if not 1 <= per_item <= len(templates):
            raise ValueError(f"{task}: per_item={per_item} needs 1..{len(templates)} templates")
        for i, item in enumerate(group["items"]):
            item = {"x": item} if isinstance(item, str) else dict(item)
            subject = item.pop("x")
            for j in range(per_item):
                template = templates[(i + j) % len(templates)]
                if "{x}" not in template:
                    raise ValueError(f"{task}: template {template!r} has no '{{x}}' slot")
                prompt = template.replace("{x}", subject)
                rows.append(
                    {
                        "prompt_id": f"{task}-{_stable_hash(task + '|' + prompt)[:10]}",
                        "prompt": prompt,
                        "split": split or ("test" if subject in test else "train"),
                        "task": task,
                        "subject": subject,
                        **group["meta"],
                        **item,
                    }
                )
    return rows


@functools.lru_cache(maxsize=None)
def _task_rows(task: str) -> tuple[dict, ...]:
    spec = json.loads((TASKS_DIR / f"{task}.json").read_text(encoding="utf-8"))
    rows = _expand(task, spec["in_distribution"], None) + _expand(task, spec["ood"], "ood")
    seen: set[str] = set()
    for row in rows:  # a duplicate would silently double-weight a prompt and break prompt->meta lookups
        if row["prompt"] in seen:
            raise ValueError(f"{task}: duplicate prompt {row['prompt']!r} in {TASKS_DIR / (task + '.json')}")
        seen.add(row["prompt"])
    return tuple(rows)


def task_of(cfg) -> Task:
    """The task a config runs: the researcher's own data when ``data.prompts`` or ``data.candidates``
    is set (source ``data``, no gold reward of its own: ``rewards.evaluation`` names one), else the
    registry's ``rewards.task``."""
    if not cfg.data.own:
        return get_task(cfg.rewards.task)
    from vcb_lib.user_data import task_name

    return Task(task_name(cfg.data), "data", gold=None, reward_name="evaluation reward", data=cfg.data)


def task_data(task: str | Task) -> str:
    """What a task's prompts are, as an artefact key records it: the sha256 (16 hex digits) of an
    embedded task's JSON file, so that editing the prompts or the split marks every artefact built
    from them stale; a hub task's dataset names (their content is the hub's, pinned by name); a
    researcher's data: its files' content and the ``data`` section (``user_data.fingerprint``)."""
    t = get_task(task) if isinstance(task, str) else task
    if t.source == "data":
        from vcb_lib.user_data import fingerprint

        return fingerprint(t.data)
    task = t.name
    if t.source == "embedded":
        return _stable_hash((TASKS_DIR / f"{task}.json").read_text(encoding="utf-8") + f"|test%={TEST_PERCENT}")[:16]
    return "|".join(x for x in (t.prompts, t.preferences, t.ood) if x)


def load_prompts(task: str, split: str = "train") -> list[dict]:
    """The embedded prompt set of ``task`` ("sentiment" | "assistant").

    ``split``: "train" | "test" | "ood" | "all" ("all" = train + test + ood, each row keeping its
    own ``split``). Rows are fresh dicts (see the module docstring) in a fixed order.
    """
    _check_choice("task", task, EMBEDDED_TASKS)
    _check_choice("split", split, SPLITS)
    return [dict(r) for r in _task_rows(task) if split == "all" or r["split"] == split]


# --------------------------------------------------------------------------------------------
# Hub datasets (the paper's settings). Each parser maps one raw row to
# {"prompt", "chosen", "rejected" (pairs only), "id" (optional)}.
# --------------------------------------------------------------------------------------------

HH_SEARCH = "\n\nAssistant:"
TLDR_SUFFIX = "\nTL;DR:"


class MalformedRow(ValueError):
    """A hub row that does not fit its dataset's schema; loaders skip it and warn with a count."""


def split_hh_dialogue(text: str) -> tuple[str, str]:
    """An HH-RLHF transcript -> (prompt up to and including the last "\\n\\nAssistant:", response).

    The response is the exact remainder (usually with a leading space), as in the DPO
    reference code, so ``prompt + response == text``.
    """
    idx = text.rfind(HH_SEARCH)
    if idx < 0:
        raise MalformedRow(f"HH-RLHF transcript has no {HH_SEARCH!r} turn: {text[:80]!r}")
    cut = idx + len(HH_SEARCH)
    return text[:cut], text[cut:]


def _parse_hh(row: Mapping) -> dict:
    prompt, chosen = split_hh_dialogue(row["chosen"])
    rejected_prompt, rejected = split_hh_dialogue(row["rejected"])
    if rejected_prompt != prompt:  # the two transcripts must share the dialogue before the last answer
        raise MalformedRow(f"HH-RLHF row: chosen and rejected differ before the last answer: {prompt[:80]!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _parse_tldr(row: Mapping) -> dict:
    # prompt = "SUBREDDIT: r/...\nTITLE: ...\nPOST: ...\nTL;DR:", label = " summary"
    return {"prompt": row["prompt"], "chosen": row["label"]}


def _tldr_summary(text: str) -> str:
    text = text.strip()
    return " " + (text[len("TL;DR:"):].strip() if text.startswith("TL;DR:") else text)


def _parse_tldr_comparisons(row: Mapping) -> dict:
    # the comparisons' prompt stops at the post and each summary starts with "TL;DR: ";
    # normalised to the SFT set's format so SFT, RM and policy share one prompt format.
    prompt = row["prompt"].rstrip()
    if not prompt.endswith("TL;DR:"):
        prompt += TLDR_SUFFIX
    return {"prompt": prompt, "chosen": _tldr_summary(row["chosen"]), "rejected": _tldr_summary(row["rejected"])}


def _parse_cnndm(row: Mapping) -> dict:
    return {"prompt": row["article"].strip() + TLDR_SUFFIX, "chosen": " " + row["highlights"].strip(), "id": row["id"]}


@dataclass(frozen=True)
class HubDataset:
    """Where a hub dataset lives and how one of its rows becomes a prompt (and a pair)."""

    path: str  # load_dataset path
    config: str | None  # load_dataset config name
    parse: Callable[[Mapping], dict]
    has_pairs: bool  # rows carry chosen + rejected (usable by load_hub_preferences)


HUB_DATASETS: dict[str, HubDataset] = {
    "Anthropic/hh-rlhf": HubDataset("Anthropic/hh-rlhf", None, _parse_hh, True),
    "CarperAI/openai_summarize_tldr": HubDataset("CarperAI/openai_summarize_tldr", None, _parse_tldr, False),
    "CarperAI/openai_summarize_comparisons": HubDataset(
        "CarperAI/openai_summarize_comparisons", None, _parse_tldr_comparisons, True
    ),
    "abisee/cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", _parse_cnndm, False),
    "cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", _parse_cnndm, False),  # legacy name
}


def _hub_rows(name: str, split: str, data_files) -> Any:
    """The raw rows: local json/jsonl files when ``data_files`` is given, else the hub."""
    _check_choice("hub dataset", name, tuple(HUB_DATASETS))
    import datasets  # heavy import, only when a hub dataset is used

    if data_files is not None:
        # a {split: files} mapping selects by split; plain files land in the json builder's "train"
        return datasets.load_dataset("json", data_files=data_files, split=split if isinstance(data_files, Mapping) else "train")
    spec = HUB_DATASETS[name]
    return datasets.load_dataset(spec.path, spec.config, split=split)


def _parsed_rows(name: str, split: str, data_files) -> Iterator[dict]:
    """Parsed rows in file order; malformed rows are skipped with one warning at the end."""
    parse, skipped, first = HUB_DATASETS[name].parse, 0, ""
    for raw in _hub_rows(name, split, data_files):
        try:
            yield parse(raw)
        except MalformedRow as err:
            skipped, first = skipped + 1, first or str(err)
    if skipped:
        warnings.warn(f"{name} [{split}]: skipped {skipped} malformed row(s); first: {first}", stacklevel=3)


def load_hub_prompts(name: str, split: str, *, data_files=None, limit: int | None = None) -> list[dict]:
    """Prompts of a hub dataset, as rows like :func:`load_prompts`' plus ``reference``.

    ``reference`` is the dataset's own answer (HH: the chosen response; TL;DR: the label;
    comparisons: the chosen summary; CNN/DM: the highlights) -- the SFT target.
    Repeated prompts (HH and the comparisons hold several rows per prompt) are kept once.
    ``data_files``: local json/jsonl file(s) in the dataset's schema instead of the hub.
    ``limit``: stop after this many distinct prompts.
    """
    _check_choice("hub dataset", name, tuple(HUB_DATASETS))
    rows, seen = [], set()
    for parsed in _parsed_rows(name, split, data_files):
        if limit is not None and len(rows) >= limit:
            break
        if parsed["prompt"] in seen:
            continue
        seen.add(parsed["prompt"])
        digest = _stable_hash(name + "|" + parsed["prompt"])[:10]
        rows.append(
            {
                "prompt_id": str(parsed.get("id") or f"{name.split('/')[-1]}-{digest}"),
                "prompt": parsed["prompt"],
                "split": split,
                "task": name,
                "reference": parsed["chosen"],
            }
        )
    return rows


def load_hub_preferences(name: str, split: str, *, data_files=None, limit: int | None = None) -> list[dict]:
    """(prompt, chosen, rejected) rows for reward-model training (Eq. 18).

    Only datasets with pairs: Anthropic/hh-rlhf, CarperAI/openai_summarize_comparisons.
    ``chosen``/``rejected`` are responses (the prompt is not repeated in them). Rows whose two
    responses are identical carry no preference and are skipped. ``limit``: at most this many rows.
    """
    _check_choice("hub dataset", name, tuple(HUB_DATASETS))
    if not HUB_DATASETS[name].has_pairs:
        with_pairs = [k for k, v in HUB_DATASETS.items() if v.has_pairs]
        raise ValueError(f"hub dataset {name!r} has no preference pairs; datasets with pairs: {', '.join(with_pairs)}")
    rows = []
    for parsed in _parsed_rows(name, split, data_files):
        if limit is not None and len(rows) >= limit:
            break
        if parsed["chosen"] != parsed["rejected"]:
            rows.append({"prompt": parsed["prompt"], "chosen": parsed["chosen"], "rejected": parsed["rejected"]})
    return rows


def task_prompts(task: str | Task, split: str, limit: int = 0) -> list[dict]:
    """Prompts of a task: a registered one (``vcb_lib.tasks``: an embedded one, ``sentiment``,
    ``assistant``, or the paper's, ``hh``, ``tldr``; hub access needed) or a researcher's own
    (:func:`task_of`, ``vcb_lib.user_data``). ``split``: train, test or ood; ``limit`` 0 = all."""
    t = get_task(task) if isinstance(task, str) else task
    if t.source == "data":
        from vcb_lib.user_data import load_prompts as load_own

        rows = [r for r in load_own(t.data) if r["split"] == split]
    elif t.source == "embedded":
        rows = load_prompts(t.name, split)
    else:
        name = t.ood if split == "ood" else t.prompts
        if name is None:
            raise ValueError(f"task {task!r} has no out-of-distribution prompt set")
        rows = load_hub_prompts(name, "test" if split == "ood" else split, limit=limit or None)
    if not rows and t.source == "data" and split != "ood":
        from vcb_lib.user_data import DataError

        raise DataError(f"your data ({t.data.prompts or t.data.candidates}) has no {split} prompts: give the split "
                        "column some, or let the split rule (data.test_percent) choose them")
    return rows[:limit] if limit else rows


# --------------------------------------------------------------------------------------------
# The candidate table D_t and its (B, n) batches
# --------------------------------------------------------------------------------------------
#
# D_t (``02_candidates/candidates.parquet``) has one row per sampled response:
#   prompt_id, split, prompt (task text), model_input (the prompt as the model saw it: chat
#   template applied), k (0..n-1), response (text), response_ids (list[int],
#   the sampled tokens: training uses these ids, never a re-tokenisation of the text), n_tokens,
#   finish_reason, ref_logp (log π_sft, computed once at generation), sampler_logp, reward.
# A prompt's rows form one group; training batches are groups, flattened to B·n sequences.


@dataclass
class CandidateGroup:
    """One prompt with its candidates (what one row of a ``(B, n)`` batch holds)."""

    prompt_id: str
    prompt: str | list[int]  # the model input (chat-formatted where the model has a template), or its token ids
    response_ids: list[list[int]]  # n_b responses as token ids
    rewards: list[float]
    ref_logps: list[float]
    # Losses that learn from judgments (LossType.judged: CUT) only; None elsewhere. ``prompt`` is then the
    # positive context (the instruction, or it with the positive judgment: training.cut_positive).
    judged_prompts: list[str | list[int]] | None = None  # each candidate's own judgment context (model input)
    negative: list[bool] | None = None  # True where the candidate's judgment is negative (Align-N + Misalign)


JUDGED_COLUMNS = {"prompt_column": "positive_input", "judged_column": "judged_input"}  # a judged D_t's contexts


def candidate_groups(table, prompt_column: str = "model_input", judged_column: str | None = None) -> list[CandidateGroup]:
    """Group a candidate table (pandas DataFrame) by prompt, candidates in ``k`` order.

    Groups come out in the order prompts first appear in the table. Rows with a missing reward
    or reference log-prob are an error (score and finish the table first). ``judged_column``: a
    judged D_t (``vcb_lib.judgments.judged_candidates``; ``candidate_groups(table, **JUDGED_COLUMNS)``):
    each group also gets its candidates' judgment contexts from that column and ``negative`` from
    ``judgment_positive``; ``prompt_column`` then names the positive context (``positive_input``).
    """
    needed = ("prompt_id", prompt_column, "k", "response_ids", "reward", "ref_logp") + \
        ((judged_column, "judgment_positive") if judged_column else ())
    missing = [c for c in needed if c not in table]
    if missing:
        raise ValueError(f"candidate table lacks column(s) {missing}; it has {list(table.columns)}")
    for column in ("reward", "ref_logp"):
        bad = table[column].isna()
        if bad.any():
            raise ValueError(f"candidate table has {int(bad.sum())} row(s) without {column} "
                             f"(first prompt_id {table.loc[bad, 'prompt_id'].iloc[0]!r})")
    groups = []
    for prompt_id, rows in table.groupby("prompt_id", sort=False):
        rows = rows.sort_values("k")
        if rows[prompt_column].nunique() != 1:
            raise ValueError(f"candidate table: prompt {prompt_id!r} has {rows[prompt_column].nunique()} different "
                             f"{prompt_column!r} values; a group shares one prompt")
        judged = {} if not judged_column else {"judged_prompts": [str(x) for x in rows[judged_column]],
                                               "negative": [not bool(x) for x in rows["judgment_positive"]]}
        groups.append(CandidateGroup(
            prompt_id=str(prompt_id), prompt=str(rows[prompt_column].iloc[0]),
            response_ids=[[int(t) for t in ids] for ids in rows["response_ids"]],
            rewards=[float(r) for r in rows["reward"]], ref_logps=[float(r) for r in rows["ref_logp"]], **judged,
        ))
    return groups


def collate_groups(tokenizer, groups: Sequence[CandidateGroup], *, max_length: int | None = None,
                   share_prompts: bool = False, judged: bool = False) -> dict:
    """B groups -> one batch: the valid responses flattened to rows of a right-padded token
    batch, plus the ``(B, n)`` tensors the losses take (``n`` = the largest group).

    ``judged`` (losses that learn from judgments, ``LossType.judged``): every group must carry
    ``judged_prompts`` and ``negative``; the batch then holds R + R⁻ rows, the R⁻ negative candidates
    once more after the R rows, in their own judgment's context (row-major order of
    ``batch["negative"]`` (B, n) bool), in the same forward.

    Returns ``input_ids, attention_mask, response_mask`` (R, T) with R = number of valid
    responses, and ``rewards, ref_logps`` (B, n) float32, ``mask`` (B, n) bool, ``n_tokens``
    (B, n) long. Row r of the flat batch is entry ``mask.nonzero()[r]`` of the (B, n) grid, so
    ``grid = zeros(B, n); grid[mask] = flat`` folds per-row values back.

    ``share_prompts``: when every group's responses share its prompt ids (always, unless
    ``max_length`` cut a prompt differently for two of them), the rows come as a
    ``logps.collate_shared_prompts`` batch instead (``prompt_ids``/``prompt_mask`` (B, Tp),
    ``completion_ids``/``completion_mask`` (R, Tc), ``prompt_index`` (R,)): ``batch_logps`` then
    runs each prompt once for its n candidates. Otherwise the flat batch above.
    """
    import torch

    from vcb_lib.logps import _pad_id, collate_pairs, collate_shared_prompts, encode_pairs

    if not groups:
        raise ValueError("collate_groups needs at least one group")
    B, n = len(groups), max(len(g.response_ids) for g in groups)
    prompts = [g.prompt for g in groups for _ in g.response_ids]
    responses = [ids for g in groups for ids in g.response_ids]
    pairs = encode_pairs(tokenizer, prompts, responses, max_length=max_length)
    pad = _pad_id(tokenizer)
    prompt_index = [b for b, g in enumerate(groups) for _ in g.response_ids]  # (R,)
    heads: dict[int, list[int]] = {}  # group -> its first row's prompt ids
    for b, (p, _) in zip(prompt_index, pairs):
        heads.setdefault(b, p)
    negative = torch.zeros(B, n, dtype=torch.bool)
    extra: list[tuple[list[int], list[int]]] = []  # judged: the negative candidates in their judgment's context
    if judged:
        lacking = [g.prompt_id for g in groups if g.judged_prompts is None or g.negative is None
                   or len(g.judged_prompts) != len(g.response_ids) or len(g.negative) != len(g.response_ids)]
        if lacking:
            raise ValueError(f"collate_groups(judged=True): group {lacking[0]!r} has no judgment per candidate "
                             "(judged_prompts, negative); build judged groups with vcb_lib.judgments")
        rows = [(b, k) for b, g in enumerate(groups) for k in range(len(g.response_ids)) if g.negative[k]]
        for b, k in rows:
            negative[b, k] = True
        if rows:
            extra = encode_pairs(tokenizer, [groups[b].judged_prompts[k] for b, k in rows],
                                 [groups[b].response_ids[k] for b, k in rows], max_length=max_length)
            flat_row = {bk: r for r, bk in enumerate((b, k) for b, g in enumerate(groups) for k in range(len(g.response_ids)))}
            cut = [(groups[b].prompt_id, k) for (b, k), (_, r) in zip(rows, extra) if len(r) != len(pairs[flat_row[b, k]][1])]
            if cut:
                raise ValueError(f"max_length={max_length} cuts the response of prompt {cut[0][0]!r}, candidate {cut[0][1]}, "
                                 "differently in its judgment's context than in the positive one; raise max_length")
    if share_prompts and all(p == heads[b] for b, (p, _) in zip(prompt_index, pairs)):
        batch = collate_shared_prompts([heads[b] for b in range(B)] + [p for p, _ in extra],
                                       [r for _, r in pairs] + [r for _, r in extra],
                                       prompt_index + [B + j for j in range(len(extra))], pad)
    else:
        batch = collate_pairs(pairs + extra, pad)  # (R + R⁻, T)
    mask = torch.zeros(B, n, dtype=torch.bool)
    rewards = torch.zeros(B, n)
    ref_logps = torch.zeros(B, n)
    for b, g in enumerate(groups):
        m = len(g.response_ids)
        mask[b, :m] = True
        rewards[b, :m] = torch.tensor(g.rewards, dtype=torch.float32)
        ref_logps[b, :m] = torch.tensor(g.ref_logps, dtype=torch.float32)
    n_tokens = torch.zeros(B, n, dtype=torch.long)
    n_tokens[mask] = batch.pop("n_tokens")[:len(pairs)]  # (R,) -> (B, n); judged rows have the same lengths
    out = {**batch, "rewards": rewards, "ref_logps": ref_logps, "mask": mask, "n_tokens": n_tokens}
    return out | {"negative": negative} if judged else out


OPTIONAL_COLUMNS = ["messages"]  # a prompt given as chat messages or with a system prompt (your data): JSON text, else absent
CANDIDATE_COLUMNS = ["prompt_id", "split", "prompt", "model_input", "k", "response", "response_ids", "n_tokens", "finish_reason",
                     "ref_logp", "sampler_logp", "reward"]


def build_candidates(prompts: Sequence[Mapping], sampler, out_dir: str | Path, *, n: int, temperature: float,
                     max_new_tokens: int, seed: int, top_p: float = 1.0, ref_model=None, tokenizer=None,
                     format_prompt: Callable[[str], str] = lambda p: p, shard_size: int = 16,
                     ref_autocast_bf16: bool = False, manifest: Mapping | None = None, progress: bool = True):
    """Sample ``n`` candidates for each prompt row (``prompt_id``, ``prompt``, ``split``) and
    return the candidate table D_t (pandas DataFrame, ``CANDIDATE_COLUMNS``, reward = NaN).

    Resumable: shard ``i`` (prompts ``[i·shard_size, (i+1)·shard_size)``) is written atomically to
    ``out_dir/shards/shard-{i:05d}.parquet`` once sampled and scored with ``ref_model``; a rerun
    skips the shards that exist, and the sampler seeds by prompt position, so an interrupted run
    continues with no sample duplicated or lost. ``manifest`` (config hash, model, sampler, …)
    is stored as ``out_dir/manifest.json``; shards written under a different manifest are moved
    to ``out_dir/stale-<hash>/`` (kept, never deleted) before sampling starts.

    ``ref_model``/``tokenizer``: π_sft, for ``ref_logp`` (computed here once, so training never
    holds a reference model); when None, ``ref_logp`` = the sampler's own log-prob, which is exact
    only for the same model at the same precision.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from vcb_lib.io import atomic_write_bytes, read_json, write_json
    from vcb_lib.logps import sequence_logps
    from vcb_lib.user_data import chat_input

    prompts = list(prompts)
    if not prompts:
        raise ValueError("build_candidates needs at least one prompt")
    if n < 2:
        raise ValueError(f"n must be >= 2 candidates per prompt (pairs are needed), got {n}")
    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    manifest = {**dict(manifest or {}), "n": n, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "shard_size": shard_size,
                "prompt_ids_digest": _stable_hash("|".join(str(p["prompt_id"]) for p in prompts))}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and read_json(manifest_path) != manifest and shard_dir.is_dir():
        stale = out_dir / f"stale-{_stable_hash(json.dumps(read_json(manifest_path), sort_keys=True))}"
        shard_dir.rename(stale)
        warnings.warn(f"candidate settings changed: the previous shards were moved to {stale}")
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path, manifest)

    starts = range(0, len(prompts), shard_size)
    bar = tqdm(total=len(prompts), desc="candidates", unit="prompt", disable=not progress)
    tokens, t_sampling = 0, 0.0
    for i, start in enumerate(starts):
        path = shard_dir / f"shard-{i:05d}.parquet"
        chunk = prompts[start:start + shard_size]
        if path.is_file():
            bar.update(len(chunk))
            continue
        inputs = [format_prompt(chat_input(p)) for p in chunk]
        t0 = time.monotonic()
        completions = sampler.generate(inputs, n, temperature, max_new_tokens, seed, top_p, first_index=start)
        t_sampling += time.monotonic() - t0
        rows = [{"prompt_id": str(p["prompt_id"]), "split": p.get("split", ""), "prompt": p["prompt"],
                 "model_input": text, "k": k, "response": c.text, "response_ids": c.token_ids,
                 "n_tokens": len(c.token_ids), "finish_reason": c.finish_reason, "sampler_logp": c.logp,
                 **({"messages": json.dumps(p["messages"], ensure_ascii=False)} if p.get("messages") else {})}
                for p, text, cs in zip(chunk, inputs, completions) for k, c in enumerate(cs)]
        if ref_model is not None:
            ref = sequence_logps(ref_model, tokenizer, [r["model_input"] for r in rows],
                                 [r["response_ids"] for r in rows], autocast_bf16=ref_autocast_bf16)
            for r, lp in zip(rows, ref.tolist()):
                r["ref_logp"] = lp
        else:
            for r in rows:
                r["ref_logp"] = r["sampler_logp"]
        frame = pd.DataFrame(rows).assign(reward=float("nan"))
        atomic_write_bytes(path, frame.to_parquet(index=False))
        tokens += int(frame["n_tokens"].sum())
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{tokens / max(t_sampling, 1e-9):.0f}")
    bar.close()
    shards = sorted(shard_dir.glob("shard-*.parquet"))
    table = pd.concat([pd.read_parquet(p) for p in shards[:len(starts)]], ignore_index=True)
    return table[CANDIDATE_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in table]]
