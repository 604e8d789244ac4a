"""A researcher's own data (``data:``, ``vcb_lib.user_data``) and rewards (``vcb_lib.reward_sources``):
every input form gives the same task rows, every candidate schema the same D_t rows, export -> import
gives back D_t, every reward kind scores, and every bad input is refused naming file, row and column."""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pandas as pd
import pytest

from vcb_lib.__main__ import main
from vcb_lib.config import PROJECT_ROOT, ConfigError, DataConfig, load_params
from vcb_lib.data import task_data, task_of, task_prompts
from vcb_lib import reward_sources
from vcb_lib.reward_sources import RewardSourceError
from vcb_lib.user_data import DataError, chat_input, load_candidates, load_prompts

SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"
TEXTS = [f"Explain topic number {i} simply." for i in range(20)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a comet?"}]


def write(path, rows, kind=None):
    """``rows`` (list of dicts) as a .jsonl / .json / .csv / .parquet file, or a saved datasets folder."""
    kind = kind or path.suffix
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == ".json":
        path.write_text(json.dumps(rows))
    elif kind == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == ".parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def data(**kw) -> DataConfig:
    return DataConfig(**{k: str(v) if k in ("prompts", "candidates") else v for k, v in kw.items()})


# --------------------------------------------------------------------------------------------
# Prompts: every form, text and chat, the split rule, the fingerprint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [".jsonl", ".json", ".csv", ".parquet", "datasets"])
def test_every_input_form_gives_the_same_prompts(tmp_path, kind):
    rows = [{"question": t, "part": "test" if i % 4 == 0 else "train"} for i, t in enumerate(TEXTS)]
    reference = load_prompts(data(prompts=write(tmp_path / "ref.jsonl", rows), name="mine", prompt_column="question"))
    got = load_prompts(data(prompts=write(tmp_path / f"p{kind if kind.startswith('.') else ''}", rows, kind), name="mine",
                            prompt_column="question"))
    assert got == reference and len(got) == 20
    assert [r["prompt"] for r in got] == TEXTS and all(r["prompt_id"].startswith("mine-") for r in got)
    by_column = load_prompts(data(prompts=tmp_path / "ref.jsonl", name="mine", prompt_column="question", split_column="part"))
    assert [r["split"] for r in by_column] == [r["part"] for r in rows]


@pytest.mark.parametrize("kind", [".jsonl", ".parquet", "datasets"])
def test_chat_prompts_and_system_prompts(tmp_path, kind, tok):
    from vcb_lib.models import format_prompt

    rows = [{"prompt": CHAT}, {"prompt": [CHAT[1] | {"content": "What is rain?"}]}, {"prompt": [{"role": "user", "content": "What is snow?"}], "sys": "Rhyme."}]  # one column type: parquet
    rows = [r | {"sys": r.get("sys", "")} for r in rows]
    got = load_prompts(data(prompts=write(tmp_path / f"c{kind if kind.startswith('.') else ''}", rows, kind),
                            system_column="sys", system_prompt="Answer kindly.", test_percent=1))
    assert [r["prompt"] for r in got] == ["What is a comet?", "What is rain?", "What is snow?"]
    assert got[0]["messages"] == CHAT  # its own system turn is kept
    assert got[1]["messages"][0] == {"role": "system", "content": "Answer kindly."}  # data.system_prompt
    assert got[2]["messages"][0] == {"role": "system", "content": "Rhyme."}  # the row's system column wins
    text = format_prompt(tok, chat_input(got[0]))
    assert text == tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in text and text.index("Be brief.") < text.index("What is a comet?")


def test_split_rule_is_seeded_and_stable(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": t} for t in TEXTS])
    a, b = load_prompts(data(prompts=path)), load_prompts(data(prompts=path))
    assert a == b and sum(r["split"] == "test" for r in a) == 6  # round(20 · 30%)
    other = load_prompts(data(prompts=path, split_seed=1))
    assert [r["split"] for r in other] != [r["split"] for r in a]
    assert sum(r["split"] == "test" for r in load_prompts(data(prompts=path, test_percent=50))) == 10


def test_the_files_content_enters_every_key(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": t} for t in TEXTS])
    cfg = load_params(SMOKE, {"data.prompts": str(path), "run.output_root": str(tmp_path), "models.sft": False,
                              "rewards.reward_model": "tests.fixtures.own_reward:length_reward"})
    from vcb_lib.stages import artefacts

    before, key = task_data(task_of(cfg)), artefacts.candidates(cfg).key
    write(path, [{"prompt": t} for t in TEXTS[:-1] + ["An edited prompt."]])
    assert task_data(task_of(cfg)) != before and artefacts.candidates(cfg).key != key
    assert task_of(cfg).source == "data" and task_of(cfg).name == "p"


# --------------------------------------------------------------------------------------------
# Candidates: the three schemas, and export -> import
# --------------------------------------------------------------------------------------------

FLAT = [{"prompt": "Name a fruit.", "response": r, "reward": x} for r, x in (("Apple.", 1.0), ("A car.", -1.0), ("Pear", 0.5))] + \
       [{"prompt": CHAT, "response": r, "reward": x} for r, x in (("A dirty snowball.", 2.0), ("I don't know", 0.0))]


def _expected():
    return [("Name a fruit.", 0, "Apple.", 1.0), ("Name a fruit.", 1, "A car.", -1.0), ("Name a fruit.", 2, "Pear", 0.5),
            ("What is a comet?", 0, "A dirty snowball.", 2.0), ("What is a comet?", 1, "I don't know", 0.0)]


def _rows(cands):
    return [(c["prompt"], c["k"], c["response"], c["reward"]) for c in cands]


def test_flat_candidates(tmp_path):
    got = load_candidates(data(candidates=write(tmp_path / "c.jsonl", FLAT)))
    assert _rows(got) == _expected() and got[3]["messages"] == CHAT and got[0]["response_ids"] is None


def test_group_candidates_the_trl_groups_schema(tmp_path):
    rows = [{"prompt": "Name a fruit.", "completions": ["Apple.", "A car.", "Pear"], "rewards": [1.0, -1.0, 0.5]},
            {"prompt": CHAT, "completions": [[{"role": "assistant", "content": "A dirty snowball."}],
                                             [{"role": "assistant", "content": "I don't know"}]], "rewards": [2, 0]}]
    assert _rows(load_candidates(data(candidates=write(tmp_path / "g.jsonl", rows)))) == _expected()


def test_ultrafeedback_candidates(tmp_path):
    rows = [{"instruction": "Name a fruit.", "completions": [{"model": "a", "response": "Apple.", "overall_score": 1.0},
                                                             {"model": "b", "response": "A car.", "overall_score": -1.0},
                                                             {"model": "c", "response": "Pear", "overall_score": 0.5}]},
            {"instruction": "What is a comet?", "completions": [{"response": "A dirty snowball.", "fine-grained_score": 2.0},
                                                                {"response": "I don't know", "fine-grained_score": 0.0}]}]
    got = load_candidates(data(candidates=write(tmp_path / "u.jsonl", rows)))
    assert [(p, k, r, x) for p, k, r, x in _rows(got)] == _expected()


def test_candidates_without_rewards_are_scored_by_the_reward_model(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "reward"} for r in FLAT]
    got = load_candidates(data(candidates=write(tmp_path / "c.jsonl", rows)))
    assert all(math.isnan(c["reward"]) for c in got)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """Stage 02 sampled on a data task (tiny random π_sft, 8 prompts x 3 candidates, a callable reward)."""
    from vcb_lib.stages import generate

    root = tmp_path_factory.mktemp("own")
    prompts = write(root / "prompts.jsonl", [{"prompt": t} for t in TEXTS[:10]] + [{"prompt": CHAT}])
    cfg = load_params(SMOKE, {"run.output_root": str(root / "runs"), "models.sft": False, "data.prompts": str(prompts),
                              "data.system_prompt": "Be kind.",
                              "rewards.reward_model": "tests.fixtures.own_reward:length_reward", "run.name": "sampled"})
    cfg.save()
    table, _ = generate.run(cfg, log=lambda m: None)
    return cfg, table


def test_sampled_data_task_and_its_callable_reward(own_run):
    cfg, table = own_run
    assert table.prompt_id.nunique() == 8 and set(table.split) == {"train"}  # 11 prompts, 3 test
    expected = [len(r.split()) - 0.5 * r.count("!") for r in table.response]
    assert np.allclose(table.reward, expected)
    assert "gold" not in table  # no evaluation reward named


def test_export_then_import_gives_back_the_same_dt(own_run):
    from vcb_lib.export import export_run
    from vcb_lib.stages import generate

    cfg, table = own_run
    out = export_run(cfg, "trl-groups", log=lambda m: None)
    again = load_params(SMOKE, {"run.output_root": str(cfg.run.output_root), "models.sft": False,
                                "data.prompts": cfg.data.prompts, "data.candidates": str(out / "train.parquet"),
                                "data.system_prompt": "Be kind.",
                                "rewards.reward_model": "tests.fixtures.own_reward:length_reward", "run.name": "imported"})
    imported, _ = generate.run(again, log=lambda m: None)
    cols = ["prompt_id", "split", "prompt", "model_input", "k", "response", "n_tokens", "finish_reason", "reward", "messages"]
    assert table.messages.map(json.loads).map(lambda m: m[0]["role"]).eq("system").all()  # the system turn travels along
    pd.testing.assert_frame_equal(imported[cols], table[cols])
    assert [list(x) for x in imported.response_ids] == [list(x) for x in table.response_ids]
    assert np.allclose(imported.ref_logp, table.ref_logp, atol=1e-4)
    assert imported.sampler_logp.isna().all()


# --------------------------------------------------------------------------------------------
# Rewards: a callable, a sequence-classifier folder, a judge with a rubric
# --------------------------------------------------------------------------------------------


def test_callable_by_module_and_by_file(tmp_path):
    by_module = reward_sources.load("tests.fixtures.own_reward:length_reward")
    by_file = reward_sources.load(str(PROJECT_ROOT / "tests" / "fixtures" / "own_reward.py") + ":length_reward")
    for r in (by_module, by_file):
        assert r.score(["p", "q"], ["a b c", "d!"]).tolist() == [3.0, 0.5]
    assert reward_sources.kind("examples/own_data/reward.py:score") == "callable"
    example = reward_sources.load("examples/own_data/reward.py:score").score(
        ["Explain a comet to a child."], ["A comet is a ball of ice and dust that flies around the sun. " * 2])
    assert example.shape == (1,) and np.isfinite(example).all()


def test_the_callables_source_enters_the_key(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def score(p, r):\n    return [1.0] * len(r)\n")
    before = reward_sources.fingerprint(f"{f}:score")
    f.write_text("def score(p, r):\n    return [2.0] * len(r)\n")
    assert reward_sources.fingerprint(f"{f}:score") != before
    assert reward_sources.fingerprint("gold") == "" == reward_sources.fingerprint("learned")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tok):
    import torch
    from transformers import LlamaForSequenceClassification

    from vcb_lib.models import tiny_random_config

    folder = tmp_path_factory.mktemp("rm") / "reward-model"
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_random_config().__class__(**{**tiny_random_config().to_dict(), "num_labels": 1}))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def test_sequence_classifier_folder(classifier):
    import torch

    from vcb_lib.rewards import LearnedRewardModel

    folder, model = classifier
    rm = reward_sources.load(str(folder))
    prompts, responses = ["What is a comet?", "Hi"], ["A snowball.", "Hello there, friend."]
    direct = LearnedRewardModel(model, rm.tokenizer).score(prompts, responses)
    assert np.allclose(rm.score(prompts, responses), direct, atol=1e-6) and len(set(direct.tolist())) == 2
    assert reward_sources.kind(str(folder)) == "model" and reward_sources.fingerprint(str(folder)).startswith("model:")
    with torch.no_grad():  # it is the model's own score at the last real token, through the chat template
        ids = rm.tokenizer(rm.model_input(prompts[0]) + responses[0], add_special_tokens=False, return_tensors="pt")
        assert abs(model(**ids).logits[0, 0].item() - direct[0]) < 1e-4


def test_judge_with_a_rubric(tmp_path):
    from test_judge import FakeJudge

    fake = FakeJudge()
    try:
        fake.script = ["Clear and kind.\nScore: 7", "Rambling.\nScore: 2", "no score here", "Score: 5"]
        rm = reward_sources.load(f"judge:{fake.url}", model="grader", rubric="Grade {response} to {prompt}.")
        rm.workers = 1
        assert rm.score(["p1", "p2", "p3"], ["r1", "r2", "r3"]).tolist() == [7.0, 2.0, 5.0]  # a reply without a score: asked again
        assert fake.requests[0]["body"]["messages"][0]["content"] == "Grade r1 to p1."
        assert fake.requests[0]["body"]["model"] == "grader"
        fake.script = ["nothing", "still nothing"]
        with pytest.raises(RewardSourceError, match=r"row 0 has no 'Score: N' line \(twice\)"):
            rm.score(["p"], ["r"])
    finally:
        fake.close()
    with pytest.raises(RewardSourceError, match=r"must contain \{prompt\} and \{response\}"):
        reward_sources.load("judge:local", model="m", rubric="Rate it.")


def test_evaluation_reward_is_the_gold_column(tmp_path, own_run):
    from vcb_lib.stages.evaluate import evaluation_reward
    from vcb_lib.stages.sft_and_reward import load_evaluation_reward

    cfg, _ = own_run
    assert evaluation_reward(cfg)[0] == "reward" and load_evaluation_reward(cfg) is None
    with_eval = load_params(SMOKE, {"data.prompts": cfg.data.prompts, "rewards.reward_model": "gold", "models.sft": False,
                                    "rewards.evaluation": "tests.fixtures.own_reward:length_reward"})
    column, name = evaluation_reward(with_eval)
    assert column == "gold" and name == "`tests.fixtures.own_reward:length_reward` reward"
    assert load_evaluation_reward(with_eval).score(["p"], ["a b"]).tolist() == [2.0]


# --------------------------------------------------------------------------------------------
# Bad input: file, row, column and what is allowed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,kw,message", [
    ([{"promt": "x"}], {}, r"p\.jsonl: row 1 has no column 'prompt' \(the prompt\); did you mean 'promt'\?"),
    ([{"prompt": "  "}], {}, r"row 1, column 'prompt': the prompt is empty"),
    ([{"prompt": "ok"}, {"prompt": 5}], {}, r"row 2, column 'prompt': a prompt must be text or a list of chat messages"),
    ([{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], {},
     r"row 1, column 'prompt': the conversation must end with a non-empty user turn"),
    ([{"prompt": [{"role": "robot", "content": "q"}]}], {}, r"row 1, column 'prompt', message 0: a message is"),
    ([{"prompt": "a"}, {"prompt": "a"}], {"duplicates": "error"}, r"row 2 repeats the prompt of row 1"),
    ([{"prompt": "a", "s": "dev"}], {"split_column": "s"}, r"row 1, column 's': split 'dev' is not one of"),
    ([{"prompt": "a"}, {"prompt": "b"}], {"split_column": "s"}, r"row 1 has no column 's' \(the split\)"),
])
def test_bad_prompt_files(tmp_path, rows, kw, message):
    path = write(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=message) as err:
        load_prompts(data(prompts=path, **kw))
    assert str(path) in str(err.value)


def test_repeated_prompts_are_dropped_and_counted(tmp_path):
    notes = []
    got = load_prompts(data(prompts=write(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}] +
                                          [{"prompt": t} for t in TEXTS])), log=notes.append)
    assert [r["prompt"] for r in got][:2] == ["a", "b"] and len(got) == 22
    assert notes == [f"{tmp_path / 'p.jsonl'}: 1 repeated prompt(s) dropped (the first row of each kept; data.duplicates)"]


def test_unreadable_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_prompts(data(prompts=tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_prompts(data(prompts=tmp_path / "bad.jsonl"))
    (tmp_path / "bin.csv").write_bytes(b"prompt\n\xff\xfe\x00")
    with pytest.raises(DataError, match=r"bin\.csv: not UTF-8 text"):
        load_prompts(data(prompts=tmp_path / "bin.csv"))
    (tmp_path / "p.txt").write_text("hello")
    with pytest.raises(DataError, match=r"is a \.txt file; allowed: \.jsonl, \.json, \.csv, \.parquet"):
        load_prompts(data(prompts=tmp_path / "p.txt"))
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist"):
        load_prompts(data(prompts=tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "response": "x", "reward": float("nan")}, {"prompt": "a", "response": "y", "reward": 1}],
     r"row 1, column 'reward': reward nan is not finite"),
    ([{"prompt": "a", "response": "x", "reward": "inf"}, {"prompt": "a", "response": "y", "reward": 1}],
     r"row 1, column 'reward': reward 'inf' is not finite"),
    ([{"prompt": "a", "response": "x", "reward": "good"}, {"prompt": "a", "response": "y", "reward": 1}],
     r"row 1, column 'reward': reward 'good' is not a number"),
    ([{"prompt": "a", "response": "x", "reward": 1}, {"prompt": "b", "response": "y", "reward": 1},
      {"prompt": "b", "response": "z", "reward": 1}], r"row 1: prompt 'a' has 1 response\(s\).*at least 2 per prompt"),
    ([{"prompt": "a", "response": 3, "reward": 1}], r"row 1, column 'response': a response is text, got int"),
    ([{"prompt": "a", "response": "x"}, {"prompt": "a", "response": "y", "reward": 1}], r"row 1 has no reward but others"),
    ([{"prompt": "a", "completions": ["x", "y"], "rewards": [1.0]}], r"row 1, column 'rewards': one reward per completion"),
    ([{"prompt": "a", "text": "x"}], r"cannot tell the candidates' schema from row 1's columns"),
    ([{"prompt": "a", "completions": ["x", "y"], "rewards": [1, 2]}, {"prompt": "a", "completions": ["z", "w"], "rewards": [1, 2]}],
     None),
])
def test_bad_candidate_files(tmp_path, rows, message):
    path = write(tmp_path / "c.jsonl", rows)
    if message is None:  # a repeated prompt row is dropped (the first kept), counted in the log
        notes = []
        assert [c["response"] for c in load_candidates(data(candidates=path), log=notes.append)] == ["x", "y"]
        assert "1 repeated prompt row(s) dropped" in notes[0]
        return
    with pytest.raises(DataError, match=message) as err:
        load_candidates(data(candidates=path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("function,message", [
    ("raises", r"(?s)raised on row 1 \(prompt 'p1', response 'boom'\):\n.*own_reward\.py.*\nValueError: cannot score 'boom'"),
    ("wrong_length", r"returned 1 value\(s\) for 2 \(prompt, response\) pairs"),
    ("not_floats", r"returned str 'high' for row 0; expected a float"),
    ("not_finite", r"returned nan for row 1; rewards must be finite"),
    ("scalar", r"returned float '1.0' for rows 0..1; expected a list of 2 floats"),
])
def test_bad_callables(function, message):
    rm = reward_sources.load(f"tests.fixtures.own_reward:{function}")
    with pytest.raises(RewardSourceError, match=message) as err:
        rm.score(["p0", "p1"], ["fine", "boom"])
    assert str(err.value).count("Traceback") <= 1 and str(err.value).count("ValueError: cannot score") <= 1


def test_bad_reward_specs(tmp_path, classifier, tok):
    from transformers import LlamaForCausalLM

    from vcb_lib.models import tiny_random_config

    causal = tmp_path / "causal"
    LlamaForCausalLM(tiny_random_config()).save_pretrained(causal)
    with pytest.raises(RewardSourceError, match=r"is not a sequence classifier \(architectures: \['LlamaForCausalLM'\]\)"):
        reward_sources.check(str(causal))
    with pytest.raises(RewardSourceError, match=r"no module 'nowhere'"):
        reward_sources.check("nowhere.mod:fn")
    with pytest.raises(RewardSourceError, match=r"has no function 'nope'; it has: .*length_reward"):
        reward_sources.check("tests.fixtures.own_reward:nope")
    with pytest.raises(RewardSourceError, match=r"no such folder"):
        reward_sources.check("./no/such/folder")


def test_config_refuses_what_own_data_cannot_do(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": t} for t in TEXTS])
    with pytest.raises(ConfigError, match=r"rewards.reward_model: gold scores D_t with the evaluation reward"):
        load_params(SMOKE, {"data.prompts": str(path), "rewards.reward_model": "gold", "models.sft": False})
    with pytest.raises(ConfigError, match=r"rewards.reward_model: learned: labels sampled pairs with the evaluation reward"):
        load_params(SMOKE, {"data.prompts": str(path), "rewards.reward_model": "learned", "models.sft": False})
    with pytest.raises(ConfigError, match=r"judge:local or judge:<http\(s\) URL>"):
        load_params(SMOKE, {"rewards.evaluation": "judge:ftp://x"})


def test_cli_names_the_bad_file_without_a_traceback(tmp_path, capsys):
    bad = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    params = tmp_path / "mine.yaml"
    params.write_text(textwrap.dedent(f"""\
        run: {{name: mine, output_root: {tmp_path}}}
        data: {{prompts: {bad}}}
        rewards: {{reward_model: tests.fixtures.own_reward:length_reward}}
        """))
    assert main(["run", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: row 2, column 'prompt': the prompt is empty" in err and "Traceback" not in err
    assert not (tmp_path / "mine").exists()  # refused before any stage wrote anything


# --------------------------------------------------------------------------------------------
# The notebooks, unchanged, on your data (tiny random π_sft, imported D_t, a callable evaluates)
# --------------------------------------------------------------------------------------------


@pytest.mark.notebook
def test_notebooks_run_on_your_data(tmp_path):
    from vcb_lib.runner import run

    overrides = [f"run.output_root={tmp_path}", "models.policy=tiny-random", "evaluation.num_prompts=4",
                 "evaluation.samples_per_prompt=2", "evaluation.max_new_tokens=8", "evaluation.pool_prompts=4",
                 "evaluation.pool_candidates=3", "evaluation.pool_max_new_tokens=8", "evaluation.bootstrap=100",
                 "sampling.backend=hf", "sampling.num_prompts=6", "training.max_steps=2", "training.batch_size=2",
                 "theory.n_instances=2"]
    run(PROJECT_ROOT / "params" / "own_data.yaml", overrides, log=lambda m: None)
    cfg = load_params(PROJECT_ROOT / "params" / "own_data.yaml", overrides)
    dt = pd.read_parquet(cfg.run_dir / "02_candidates" / "candidates.parquet")
    assert dt.prompt_id.nunique() == 6 and (dt.groupby("prompt_id").size() == 4).all()
    source = pd.read_json(PROJECT_ROOT / "examples" / "own_data" / "candidates.jsonl", lines=True)
    assert set(dt.response) <= set(source.response) and set(dt.reward) <= set(source.reward.round(4))
    metrics = json.loads((cfg.run_dir / "04_eval" / "metrics.json").read_text())
    assert metrics["evaluation_reward"] == "gold" and metrics["scale"]["task"] == "kids_science"
    assert set(metrics["pool"]["methods"]) == {"sft", "vcb", "dpo"}
    report = (cfg.run_dir / "report.md").read_text()
    assert "**Your data:** task `kids_science`: prompts from `examples/own_data/prompts.jsonl`" in report
    assert "D_t imported from `examples/own_data/candidates.jsonl`" in report
    assert "evaluation reward: `examples/own_data/reward.py:score` reward" in report
