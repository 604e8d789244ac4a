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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

TASKS = ("sentiment", "assistant")
SPLITS = ("train", "test", "ood", "all")
TEST_PERCENT = 20  # share of each group's in-distribution items (not prompts) held out for test
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = [
    "TASKS",
    "SPLITS",
    "TASKS_DIR",
    "load_prompts",
    "HUB_DATASETS",
    "HubDataset",
    "load_hub_prompts",
    "load_hub_preferences",
    "split_hh_dialogue",
    "MalformedRow",
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


def load_prompts(task: str, split: str = "train") -> list[dict]:
    """The embedded prompt set of ``task`` ("sentiment" | "assistant").

    ``split``: "train" | "test" | "ood" | "all" ("all" = train + test + ood, each row keeping its
    own ``split``). Rows are fresh dicts (see the module docstring) in a fixed order.
    """
    _check_choice("task", task, TASKS)
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
