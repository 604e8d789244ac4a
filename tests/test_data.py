"""Embedded prompt sets (fixed splits, OOD sets) and the hub loaders on hand-written fixtures."""

import hashlib
import json
from pathlib import Path

import pytest

from vcb_lib import data
from vcb_lib.data import EMBEDDED_TASKS, load_hub_preferences, load_hub_prompts, load_prompts, split_hh_dialogue
from vcb_lib.tasks import get_task

# The natural-language tasks (the exact task's prompts are three tokens of its six-token language: tests/test_exact.py)
LANGUAGE_TASKS = tuple(t for t in EMBEDDED_TASKS if not get_task(t).exact)

FIXTURES = Path(__file__).parent / "fixtures"

# The split is part of the experiment: these numbers change only when someone edits
# vcb_lib/tasks/*.json on purpose (then update them here and say so in the change).
# Issue #17: 30% of the subjects held out and 40 sentiment subjects added (69 -> 138 test prompts),
# so that the shared evaluation pool has the prompts its paired CIs need.
EXPECTED_COUNTS = {
    ("sentiment", "train"): 342,
    ("sentiment", "test"): 138,
    ("sentiment", "ood"): 80,
    ("assistant", "train"): 221,
    ("assistant", "test"): 97,
    ("assistant", "ood"): 77,
    ("exact", "train"): 17,
    ("exact", "test"): 7,
    ("exact", "ood"): 8,
}
# sha256 of the sorted prompt ids of each split, first 16 hex digits: pins split membership
EXPECTED_DIGESTS = {
    ("sentiment", "train"): "d422bf308c97c1a9",
    ("sentiment", "test"): "b3235506f4a166d0",
    ("sentiment", "ood"): "27a7bc51fa42a529",
    ("assistant", "train"): "b95208304498bfd7",
    ("assistant", "test"): "077f150d4939a28b",
    ("assistant", "ood"): "66a82bd308c57e09",
    ("exact", "train"): "b567ad92e481780a",
    ("exact", "test"): "091bb72dea4ce6a4",
    ("exact", "ood"): "8be2a4870d478f27",
}
QTYPES = {"short_fact", "explain", "howto", "list", "creative"}


# ---- embedded tasks ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", LANGUAGE_TASKS)
def test_at_least_300_in_distribution_prompts_and_60_ood(task):
    assert len(load_prompts(task, "train")) + len(load_prompts(task, "test")) >= 300
    assert len(load_prompts(task, "ood")) >= 60


@pytest.mark.parametrize("task,split", sorted(EXPECTED_COUNTS))
def test_split_is_fixed(task, split):
    rows = load_prompts(task, split)
    ids = sorted(r["prompt_id"] for r in rows)
    assert len(rows) == EXPECTED_COUNTS[task, split]
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] == EXPECTED_DIGESTS[task, split]
    assert [r["prompt_id"] for r in load_prompts(task, split)] == [r["prompt_id"] for r in rows]
    assert {r["split"] for r in rows} == {split}


@pytest.mark.parametrize("task", EMBEDDED_TASKS)
def test_split_is_about_70_30(task):
    n_train, n_test = len(load_prompts(task, "train")), len(load_prompts(task, "test"))
    assert 0.25 <= n_test / (n_train + n_test) <= 0.35


@pytest.mark.parametrize("task", EMBEDDED_TASKS)
def test_no_duplicates_and_all_is_the_union(task):
    rows = load_prompts(task, "all")
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert len(rows) == sum(len(load_prompts(task, s)) for s in ("train", "test", "ood"))


@pytest.mark.parametrize("task", EMBEDDED_TASKS)
def test_splits_are_disjoint_by_prompt_and_subject(task):
    by = {s: load_prompts(task, s) for s in ("train", "test", "ood")}
    prompts = {s: {r["prompt"] for r in rows} for s, rows in by.items()}
    subjects = {s: {r["subject"] for r in rows} for s, rows in by.items()}
    for a, b in [("train", "test"), ("train", "ood"), ("test", "ood")]:
        assert not prompts[a] & prompts[b]
        assert not subjects[a] & subjects[b], f"a subject is in both {a} and {b}"


@pytest.mark.parametrize("task", LANGUAGE_TASKS)
def test_rows_have_the_documented_keys(task):
    meta = "qtype" if task == "assistant" else "category"
    for row in load_prompts(task, "all"):
        assert {"prompt_id", "prompt", "split", "task", "subject", meta} <= set(row)
        assert row["prompt_id"].startswith(f"{task}-") and row["task"] == task
        assert row["prompt"].strip() == row["prompt"] and "{x}" not in row["prompt"]
        assert row["prompt"][0].isupper() and row["prompt"][-1] in ".?!"


def test_assistant_qtypes_cover_every_split():
    for split in ("train", "test", "ood"):
        rows = load_prompts("assistant", split)
        assert {r["qtype"] for r in rows} == QTYPES, split
        assert all(r["topic"] for r in rows)


def test_sentiment_ood_uses_other_domains():
    ind = {r["category"] for r in load_prompts("sentiment", "train")}
    ood = {r["category"] for r in load_prompts("sentiment", "ood")}
    assert ind == {r["category"] for r in load_prompts("sentiment", "test")}
    assert not ind & ood


def test_rows_are_fresh_copies():
    load_prompts("sentiment", "train")[0]["prompt"] = "mutated"
    assert load_prompts("sentiment", "train")[0]["prompt"] != "mutated"


def test_unknown_task_or_split_names_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown task 'movies'.*'sentiment', 'assistant'"):
        load_prompts("movies", "train")
    with pytest.raises(ValueError, match=r"unknown split 'valid'.*'train', 'test', 'ood', 'all'"):
        load_prompts("sentiment", "valid")


# ---- hub loaders on fixture files in the real schemas ------------------------------------------


def _raw(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_hh_prompts_end_with_assistant_and_references_are_the_remainders():
    raw = _raw("hh_rlhf.jsonl")
    rows = load_hub_prompts("Anthropic/hh-rlhf", "test", data_files=str(FIXTURES / "hh_rlhf.jsonl"))
    assert len(rows) == 3  # rows 0 and 2 share their prompt: kept once
    for row in rows:
        assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman:")
        assert row["split"] == "test" and row["task"] == "Anthropic/hh-rlhf"
    assert rows[0]["prompt"] + rows[0]["reference"] == raw[0]["chosen"]
    multi = rows[1]["prompt"]  # multi-turn: cut at the LAST assistant turn
    assert multi.count("\n\nAssistant:") == 2 and "French press." in multi
    assert rows[1]["reference"] == " Use a coarser grind, water just off the boil, and steep for about four minutes before pressing."
    ids = [r["prompt_id"] for r in rows]
    assert len(set(ids)) == 3 and ids == [r["prompt_id"] for r in load_hub_prompts("Anthropic/hh-rlhf", "test", data_files=str(FIXTURES / "hh_rlhf.jsonl"))]


def test_hh_preferences_are_prompt_and_two_remainders():
    raw = _raw("hh_rlhf.jsonl")
    pairs = load_hub_preferences("Anthropic/hh-rlhf", "train", data_files=str(FIXTURES / "hh_rlhf.jsonl"))
    assert len(pairs) == 3  # the tie (row 3, chosen == rejected) carries no preference
    for pair, src in zip(pairs, raw):
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["prompt"] + pair["chosen"] == src["chosen"]
        assert pair["prompt"] + pair["rejected"] == src["rejected"]
    assert pairs[1]["rejected"] == " Add more sugar."
    assert len(load_hub_preferences("Anthropic/hh-rlhf", "train", data_files=str(FIXTURES / "hh_rlhf.jsonl"), limit=2)) == 2


def test_hh_malformed_rows_are_skipped_with_a_warning(tmp_path):
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: bye\n\nAssistant: ok"}
    path = tmp_path / "hh.jsonl"
    path.write_text((FIXTURES / "hh_rlhf.jsonl").read_text() + json.dumps(bad) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        pairs = load_hub_preferences("Anthropic/hh-rlhf", "train", data_files=str(path))
    assert len(pairs) == 3
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_hh_dialogue("\n\nHuman: no answer yet")


def test_tldr_sft_prompts_and_labels():
    raw = _raw("tldr_sft.jsonl")
    rows = load_hub_prompts("CarperAI/openai_summarize_tldr", "train", data_files={"train": str(FIXTURES / "tldr_sft.jsonl")})
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in raw]
    assert [r["reference"] for r in rows] == [r["label"] for r in raw]
    assert all(r["prompt"].startswith("SUBREDDIT: r/") and r["prompt"].endswith("\nTL;DR:") for r in rows)
    assert len(load_hub_prompts("CarperAI/openai_summarize_tldr", "train", data_files=str(FIXTURES / "tldr_sft.jsonl"), limit=2)) == 2


def test_tldr_comparisons_are_normalised_to_the_sft_format():
    path = str(FIXTURES / "tldr_comparisons.jsonl")
    pairs = load_hub_preferences("CarperAI/openai_summarize_comparisons", "train", data_files=path)
    assert len(pairs) == 3  # the tie is skipped
    for pair in pairs:
        assert pair["prompt"].endswith("\nTL;DR:")
        assert pair["chosen"].startswith(" ") and "TL;DR" not in pair["chosen"] and "TL;DR" not in pair["rejected"]
    assert pairs[0]["chosen"] == " Roommate keeps eating my snacks and claims she forgot they were mine."
    assert pairs[0]["rejected"] == " I like snacks."
    prompts = load_hub_prompts("CarperAI/openai_summarize_comparisons", "train", data_files=path)
    assert len(prompts) == 3  # four rows, three posts


@pytest.mark.parametrize("name", ["cnn_dailymail", "abisee/cnn_dailymail"])
def test_cnn_dailymail_prompt_is_article_plus_tldr(name):
    raw = _raw("cnn_dailymail.jsonl")
    rows = load_hub_prompts(name, "test", data_files=str(FIXTURES / "cnn_dailymail.jsonl"))
    assert [r["prompt_id"] for r in rows] == [r["id"] for r in raw]
    assert [r["prompt"] for r in rows] == [r["article"] + "\nTL;DR:" for r in raw]
    assert rows[0]["reference"].strip() == raw[0]["highlights"]


def test_hub_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown hub dataset 'imdb'.*'Anthropic/hh-rlhf'"):
        load_hub_prompts("imdb", "train", data_files=str(FIXTURES / "hh_rlhf.jsonl"))
    with pytest.raises(ValueError, match=r"has no preference pairs.*Anthropic/hh-rlhf.*openai_summarize_comparisons"):
        load_hub_preferences("cnn_dailymail", "test", data_files=str(FIXTURES / "cnn_dailymail.jsonl"))


def test_hub_registry_points_at_the_paper_datasets():
    assert data.HUB_DATASETS["cnn_dailymail"].path == "abisee/cnn_dailymail"
    assert data.HUB_DATASETS["abisee/cnn_dailymail"].config == "3.0.0"
    assert {k for k, v in data.HUB_DATASETS.items() if v.has_pairs} == {
        "Anthropic/hh-rlhf",
        "CarperAI/openai_summarize_comparisons",
    }
