"""Stage 04 (vcb_lib.stages.evaluate) on tables of samples, with the fake judge server of test_judge.py."""
import pytest
from test_judge import FakeJudge, client

from vcb_lib.stages import evaluate as ev


@pytest.fixture
def fake_judge():
    fake = FakeJudge()
    yield fake
    fake.close()


def test_judge_win_rates_compares_the_reference_with_every_policy(fake_judge):
    """Notebook 04's judge call: VCB's first sample per prompt against each other policy's, both
    orders; off without judge_url."""
    import pandas as pd

    from vcb_lib.config import load_params

    rows = [{"method": m, "prompt_id": f"p{i}", "prompt": f"q{i}", "k": k, "response": f"{m}-{i}-{k}"}
            for m in ("sft", "vcb", "dpo") for i in range(2) for k in range(2)]
    samples = pd.DataFrame(rows)
    cfg = load_params(None, {"training.methods": ["vcb", "dpo"], "evaluation.bootstrap": 50})
    assert ev.judge_win_rates(cfg, samples) == {}  # judge_url empty: off
    fake_judge.script = ["Result: A", "Result: B", "Result: B", "Result: A",  # vs sft: win, loss
                         "Result: C", "Result: C", "Result: A", "Result: A"]  # vs dpo: tie, tie
    out = ev.judge_win_rates(cfg, samples, client=client(fake_judge), log=lambda m: None)
    assert list(out) == ["sft", "dpo"]
    assert (out["sft"]["win"], out["sft"]["lose"]) == (0.5, 0.5) and out["dpo"]["tie"] == 1.0
    first = fake_judge.requests[0]["body"]["messages"][0]["content"]
    assert "Dialogue: q0\nResponse A: vcb-0-0\nResponse B: sft-0-0" in first  # k = 0 samples only
    with pytest.raises(ValueError, match="judge_model is empty"):
        ev.judge_win_rates(load_params(None, {"evaluation.judge_url": fake_judge.url}), samples)
