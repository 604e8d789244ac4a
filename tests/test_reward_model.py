"""The learned Bradley-Terry reward model (Eq. 18): it learns, it is measured, it is loaded."""
import numpy as np
import pandas as pd
import pytest

from vcb_lib import rewards
from vcb_lib.config import load_params

POSITIVE = ["It was wonderful, I loved every minute.", "A delightful, brilliant experience.", "Great fun and truly excellent.",
            "I enjoyed it a lot, superb and charming.", "Absolutely lovely, a joy from start to end.", "Fantastic and beautiful work."]
NEGATIVE = ["It was awful, I hated every minute.", "A dull, terrible experience.", "Boring and truly horrible.",
            "I disliked it a lot, bad and annoying.", "Absolutely dreadful, a pain from start to end.", "Ugly and disappointing work."]


def sentiment_pairs(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    subjects = ["the film Jaws", "the cafe downtown", "this phone", "the novel Dune", "the museum", "my new chair"]
    rows = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        rows.append({"prompt_id": f"p{seed}-{i}", "prompt": f"Give your honest opinion about {s}.",
                     "chosen": POSITIVE[rng.integers(6)], "rejected": NEGATIVE[rng.integers(6)],
                     "gold_chosen": 1.0, "gold_rejected": -1.0})
    return pd.DataFrame(rows)


@pytest.fixture
def cfg(tmp_path):
    return load_params(None, [f"run.output_root={tmp_path}", "run.name=rm", "rewards.rm_learning_rate=3e-3",
                              "rewards.rm_epochs=3", "training.batch_size=8", "training.warmup_steps=0"])


def test_reward_model_learns_preferences_beats_chance(cfg):
    train, held = sentiment_pairs(48, seed=0).assign(split="train"), sentiment_pairs(24, seed=1).assign(split="heldout")
    # held-out pairs are new combinations; swap half so "chosen first" cannot be memorised by position
    pairs = pd.concat([train, held], ignore_index=True)
    rm = rewards.train_reward_model(cfg, pairs, log=lambda m: None)
    result = rewards.evaluate_reward_model(cfg, rm, pairs)
    assert result["accuracy"] >= 0.8, result  # chance is 0.5
    assert result["pearson_gold"] > 0.5
    saved = (cfg.run_dir / "01_models" / "reward_model")
    assert (saved / "accuracy.json").is_file()
    again = rewards.load_reward_model(cfg)  # "learned" loads the saved model
    np.testing.assert_allclose(again.score(list(held.prompt), list(held.chosen)),
                               rm.score(list(held.prompt), list(held.chosen)), atol=1e-5)


def test_load_reward_model_errors(cfg):
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        rewards.load_reward_model(cfg)
    gold = rewards.load_reward_model(load_params(None, ["rewards.reward_model=gold"]))
    assert isinstance(gold, rewards.SentimentGold)


def test_learned_scores_reject_bad_input(cfg):
    model, tok = rewards.reward_model_backbone("tiny-random")
    rm = rewards.LearnedRewardModel(model, tok)
    with pytest.raises(ValueError, match="empty response list"):
        rm.score([], [])
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        rm.score(["a", "b"], ["c"])
