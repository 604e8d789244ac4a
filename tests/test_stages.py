"""Stage 04 (vcb_lib.stages.evaluate) on tables of samples, with the fake judge server of test_judge.py."""
import pytest
from test_judge import FakeJudge, client

from vcb_lib.stages import evaluate as ev


@pytest.fixture
def fake_judge():
    fake = FakeJudge()
    yield fake
    fake.close()


def test_judge_win_rates_compares_the_reference_with_every_policy(fake_judge, tmp_path):
    """Notebook 04's judge call: VCB's first sample per prompt against each other policy's, both
    orders; off without evaluation.judge."""
    import pandas as pd

    from vcb_lib.config import load_params

    rows = [{"method": m, "prompt_id": f"p{i}", "prompt": f"q{i}", "k": k, "response": f"{m}-{i}-{k}"}
            for m in ("sft", "vcb", "dpo") for i in range(2) for k in range(2)]
    samples = pd.DataFrame(rows)
    cfg = load_params(None, {"training.methods": ["vcb", "dpo"], "evaluation.bootstrap": 50,
                             "evaluation.judge_workers": 1, "run.output_root": str(tmp_path)})  # the script's order
    assert ev.judge_win_rates(cfg, samples) == {}  # evaluation.judge empty: off
    fake_judge.script = ["Result: A", "Result: B", "Result: B", "Result: A",  # vs sft: win, loss
                         "Result: C", "Result: C", "Result: A", "Result: A"]  # vs dpo: tie, tie
    out = ev.judge_win_rates(cfg, samples, client=client(fake_judge), log=lambda m: None)
    assert list(out) == ["sft", "dpo"]
    assert (out["sft"]["win"], out["sft"]["lose"]) == (0.5, 0.5) and out["dpo"]["tie"] == 1.0
    first = fake_judge.requests[0]["body"]["messages"][0]["content"]
    assert "Dialogue: q0\nResponse A: vcb-0-0\nResponse B: sft-0-0" in first  # k = 0 samples only
    with pytest.raises(ValueError, match="judge_model is empty"):
        ev.judge_win_rates(load_params(None, {"evaluation.judge": fake_judge.url}), samples)


def test_non_finite_rewards_are_refused_naming_column_and_rows():
    import numpy as np
    import pandas as pd

    from vcb_lib.stages.generate import check_rewards

    table = pd.DataFrame({"reward": [0.1, np.inf, 0.3, -np.inf], "gold": [0.0, 0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match=r"D_t: 2 non-finite value\(s\) in column 'reward' \(first rows \[1, 3\]\)"):
        check_rewards(table, ("reward", "gold"), "D_t")
    assert check_rewards(table.iloc[[0, 2]], ("reward", "gold"), "D_t") is not None


@pytest.mark.notebook
def test_a_later_stage_on_a_fresh_run_names_the_stage_to_run_first(tmp_path):
    """Issue #16: `--only 05` on a fresh run used to end in a bare FileNotFoundError."""
    from vcb_lib.config import PROJECT_ROOT
    from vcb_lib.runner import StageFailed, run

    with pytest.raises(StageFailed, match=r"metrics.json is not built yet.*run stage 04_evaluate first"):
        run(PROJECT_ROOT / "params" / "smoke.yaml", [f"run.output_root={tmp_path}"], only=["05"], log=lambda m: None)


def test_stage_01_with_the_gold_scorer_and_no_sft_samples_nothing(tmp_path):
    from vcb_lib.config import load_params
    from vcb_lib.rewards import SentimentGold
    from vcb_lib.stages import sft_and_reward

    cfg = load_params(None, {"run.output_root": str(tmp_path), "rewards.reward_model": "gold"})
    out = sft_and_reward.run(cfg, log=lambda m: None)
    assert out["pairs"] is None and out["sft"] is None and isinstance(out["reward_model"], SentimentGold)
    assert sft_and_reward.read_metrics(cfg)["accuracy"] is None and not (cfg.run_dir / "01_models" / "pairs.parquet").exists()


def test_edited_task_data_makes_every_artefact_built_from_it_stale(tmp_path, monkeypatch):
    """The prompts are an input like the config: a D_t built from the old sentiment.json must not be
    read as current after the file changes (its key records ``task_data``)."""
    import json
    import shutil

    from vcb_lib import data
    from vcb_lib.config import load_params
    from vcb_lib.stages import artefacts

    cfg = load_params(None, {"run.output_root": str(tmp_path)})
    before = {a.label: a.key for a in (artefacts.candidates(cfg), artefacts.pairs(cfg), artefacts.pool(cfg),
                                      artefacts.method(cfg, "vcb"), artefacts.eval_metrics(cfg))}
    tasks = tmp_path / "tasks"
    shutil.copytree(data.TASKS_DIR, tasks)
    spec = json.loads((tasks / "sentiment.json").read_text())
    spec["in_distribution"][0]["items"].append("Metropolis")
    (tasks / "sentiment.json").write_text(json.dumps(spec))
    monkeypatch.setattr(data, "TASKS_DIR", tasks)
    after = {a.label: a.key for a in (artefacts.candidates(cfg), artefacts.pairs(cfg), artefacts.pool(cfg),
                                     artefacts.method(cfg, "vcb"), artefacts.eval_metrics(cfg))}
    for name in before:
        changed = {k for k in before[name] if before[name][k] != after[name][k]}
        assert changed == {"task_data"}, name
