"""The learned Bradley-Terry reward model (Eq. 18): it learns, it is measured, it is loaded."""
import numpy as np
import pandas as pd
import pytest

from vcb_lib import rewards
from vcb_lib.config import load_params
from vcb_lib.manifest import ArtefactError
from vcb_lib.stages import sft_and_reward

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


@pytest.mark.parametrize("backbone", ["policy", "minilm"])
def test_reward_model_learns_preferences_beats_chance(cfg, backbone):
    """On the policy's (tiny) decoder and on the packaged MiniLM encoder."""
    import dataclasses

    cfg = dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, rm_backbone=backbone))
    train, held = sentiment_pairs(48, seed=0).assign(split="train"), sentiment_pairs(24, seed=1).assign(split="heldout")
    # held-out pairs are new combinations; swap half so "chosen first" cannot be memorised by position
    pairs = pd.concat([train, held], ignore_index=True)
    rm = sft_and_reward.train_reward_model(cfg, pairs, log=lambda m: None)
    result = sft_and_reward.evaluate_reward_model(rm, pairs)
    assert result["accuracy"] >= 0.8, result  # chance is 0.5
    assert result["pearson_gold"] > 0.5
    again = sft_and_reward.load_reward_model(cfg)  # "learned" loads the saved model
    np.testing.assert_allclose(again.score(list(held.prompt), list(held.chosen)),
                               rm.score(list(held.prompt), list(held.chosen)), atol=1e-5)


def test_load_reward_model_errors(cfg):
    with pytest.raises(ArtefactError, match="reward_model is not built yet.*run stage 01_sft_and_reward"):
        sft_and_reward.load_reward_model(cfg)
    gold = sft_and_reward.load_reward_model(load_params(None, ["rewards.reward_model=gold"]))
    assert isinstance(gold, rewards.SentimentGold)


def test_learned_scores_reject_bad_input(cfg):
    model, tok = rewards.reward_model_backbone("tiny-random")
    rm = rewards.LearnedRewardModel(model, tok)
    with pytest.raises(ValueError, match="empty response list"):
        rm.score([], [])
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        rm.score(["a", "b"], ["c"])


def test_encoder_reward_model_trains_on_what_it_scores():
    """MiniLM reads [CLS] prompt [SEP] response [SEP]; the training rows (groups -> collate_groups ->
    reward_scores) are the ids ``score`` feeds it, so both give the same value."""
    from vcb_lib.data import collate_groups
    from vcb_lib.trainers import reward_scores

    model, tok = rewards.reward_model_backbone("minilm")
    rm = rewards.LearnedRewardModel(model, tok)
    assert not rm.decoder
    group = rm.groups(["Give your opinion about the museum."], [POSITIVE[0]], [NEGATIVE[0]])[0]
    assert group.prompt[0] == tok.cls_token_id and group.prompt[-1] == tok.sep_token_id
    assert all(ids[-1] == tok.sep_token_id for ids in group.response_ids)
    batch = collate_groups(tok, [group])
    trained = reward_scores(model.eval(), batch).detach().numpy()
    scored = rm.score(["Give your opinion about the museum."] * 2, [POSITIVE[0], NEGATIVE[0]])
    np.testing.assert_allclose(trained, scored, atol=1e-5)
