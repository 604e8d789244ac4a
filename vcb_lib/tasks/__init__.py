"""The task registry: every value ``rewards.task`` may take, with what the stages need to know.

A researcher's own prompts need no entry here: the config's ``data:`` section names them and
``vcb_lib.data.task_of`` builds their :class:`Task` (source ``data``). Adding an embedded task is its data file ``vcb_lib/tasks/<name>.json`` (templates × items, see
``vcb_lib.data``) plus one :class:`Task` entry below; a new kind of gold reward is a class in
``vcb_lib.rewards.GOLD_REWARDS`` named by ``gold``. The ``exact`` task (``vcb_lib/tasks/exact.py``)
is a small language whose every response can be enumerated: its metrics are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Task:
    name: str  # the value of rewards.task
    source: Literal["embedded", "hub", "data"]  # embedded: vcb_lib/tasks/<name>.json; hub: the datasets below; data: a researcher's own (config data:, vcb_lib.user_data)
    gold: str | None  # key of vcb_lib.rewards.GOLD_REWARDS scoring it; None = no gold reward (the reward model evaluates)
    reward_name: str  # the evaluation reward as reports name it
    judge_kind: Literal["dialogue", "summary"] = "dialogue"  # A.3 prompt the LLM judge gets
    prompts: str = ""  # hub dataset of train/test prompts (and SFT references)
    preferences: str = ""  # hub dataset of human preference pairs (reward model)
    ood: str | None = None  # hub dataset of out-of-distribution prompts (Table 5); None = none
    exact: bool = False  # every response is enumerable (vcb_lib.tasks.exact): SFT fits its known target, stage 04 adds exact metrics
    data: Any = None  # source "data": the config's DataConfig (where the prompts and candidates are, which columns hold what)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sentiment", "embedded", gold="sentiment", reward_name="VADER compound sentiment (gold)"),
    Task("assistant", "embedded", gold="assistant", reward_name="white-box assistant reward (gold)"),
    Task("exact", "embedded", gold="exact", reward_name="exact-task reward (gold)", exact=True),
    Task("hh", "hub", gold=None, reward_name="reward model", prompts="Anthropic/hh-rlhf",
         preferences="Anthropic/hh-rlhf"),
    Task("tldr", "hub", gold=None, reward_name="reward model", judge_kind="summary",
         prompts="CarperAI/openai_summarize_tldr", preferences="CarperAI/openai_summarize_comparisons",
         ood="abisee/cnn_dailymail"),
)}


def get_task(name: str) -> Task:
    """The registry entry; ``ValueError`` listing the allowed names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(map(repr, TASKS))}")
    return TASKS[name]
