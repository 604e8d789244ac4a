"""Gold rewards of the embedded tasks: documented behaviour on hand-written examples, determinism, errors."""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcb_lib import rewards
from vcb_lib.data import load_prompts
from vcb_lib.rewards import (
    ASSISTANT_WEIGHTS,
    LENGTH_TARGETS,
    AssistantGold,
    RewardModel,
    SentimentGold,
    embed,
    gold_reward,
    is_unfinished,
    length_penalty,
    repetition_fraction,
)


@functools.lru_cache(maxsize=None)
def _gold(task):
    return gold_reward(task)  # MiniLM itself is cached by rewards.load_minilm


RICE_Q = "What's the best way to cook rice on the stove?"  # an embedded howto prompt
RICE = (
    "Rinse one cup of rice, then put it in a pot with two cups of water and a pinch of salt. "
    "Bring it to a boil, cover, and turn the heat down low. Simmer for about 18 minutes until "
    "the water is absorbed, then let it rest for five minutes and fluff it with a fork."
)
CAPITAL_Q = "What is the capital of Australia?"  # an embedded short_fact prompt
CAPITAL = "The capital of Australia is Canberra, not Sydney as many people assume."


# ---- sentiment -------------------------------------------------------------------------------


def test_sentiment_positive_above_negative_and_in_range():
    pos = "I loved this film. The acting was wonderful and the ending made me smile."
    neg = "A dull, boring film. The acting was terrible and I hated the ending."
    neutral = "The film is two hours long and was released in March."
    s = _gold("sentiment").score(["Review the film."] * 3, [pos, neg, neutral])
    assert s.dtype == np.float64 and s.shape == (3,)
    assert s[0] > 0.5 > s[2] > -0.5 > s[1]
    assert np.all((-1 <= s) & (s <= 1))


def test_sentiment_empty_response_gets_the_floor_and_features_match_score():
    g = _gold("sentiment")
    s = g.score(["p", "p"], ["", "   "])
    assert s.tolist() == [SentimentGold.EMPTY_REWARD] * 2
    df = g.features(["p", "p"], ["Great!", "Awful."])
    assert list(df.columns) == ["n_words", "neg", "neu", "pos", "compound", "reward"]
    assert df["reward"].tolist() == g.score(["p", "p"], ["Great!", "Awful."]).tolist()


# ---- assistant: documented behaviour on hand-written examples ----------------------------------


def _ab(question, better, worse, **kw):
    s = _gold("assistant").score([question, question], [better, worse], **kw)
    return s[0], s[1]


def test_assistant_on_topic_above_off_topic():
    off = (
        "The French Revolution began in 1789 and ended the monarchy. It spread new ideas about "
        "citizenship and rights across Europe and inspired many later movements around the world."
    )
    good, bad = _ab(RICE_Q, RICE, off)
    assert good > bad + 1.0


def test_assistant_clean_above_repetitive():
    rep = " ".join(["Cook the rice in water on the stove."] * 6)
    good, bad = _ab(RICE_Q, RICE, rep)
    assert good > bad + 1.0
    assert _gold("assistant").features([RICE_Q], [rep])["repetition"].item() > 0.7


def test_assistant_finished_above_truncated():
    truncated = RICE.rsplit(" and", 1)[0] + " and"  # cut mid-sentence, as max_new_tokens would
    good, bad = _ab(RICE_Q, RICE, truncated)
    assert good - bad == pytest.approx(1.0, abs=0.1)  # the unfinished weight, relevance barely moves


def test_assistant_length_appropriate_above_far_too_long_or_short():
    sentence = (
        "Canberra was planned as the capital in 1908 as a compromise between Sydney and Melbourne, "
        "and Parliament first met there in 1927 after years of construction. "
    )
    too_long = CAPITAL + " " + " ".join(sentence.replace("years", f"{k} years") for k in range(2, 8))
    good, long_ = _ab(CAPITAL_Q, CAPITAL, too_long)
    _, short = _ab(CAPITAL_Q, CAPITAL, "Canberra.")
    assert good > long_ + 0.5 and good > short + 0.5
    df = _gold("assistant").features([CAPITAL_Q] * 3, [CAPITAL, too_long, "Canberra."])
    assert df["qtype"].tolist() == ["short_fact"] * 3
    assert df["length_penalty"].tolist()[0] == 0.0 and min(df["length_penalty"].tolist()[1:]) > 0.9


def test_assistant_echo_of_the_question_is_not_an_answer():
    good, echo = _ab(RICE_Q, RICE, RICE_Q)
    assert good > echo + 0.5
    assert _gold("assistant").features([RICE_Q], [RICE_Q])["copying"].item() == 1.0


def test_assistant_list_format_bonus_only_for_list_questions():
    q = next(r["prompt"] for r in load_prompts("assistant", "all") if r["qtype"] == "list")
    bullets = "Here are a few:\n- Oatmeal with berries\n- Greek yogurt with honey\n- Toast with avocado\n- A vegetable omelette"
    df = _gold("assistant").features([q, RICE_Q], [bullets, bullets])
    assert df["list_format"].tolist() == [1.0, 0.0]


def test_assistant_empty_response_is_low_and_finite():
    s = _gold("assistant").score([RICE_Q, RICE_Q], ["", RICE])
    assert np.isfinite(s).all() and s[0] == pytest.approx(-2.0, abs=1e-6) and s[0] < s[1]


def test_assistant_features_compose_the_reward():
    g = _gold("assistant")
    prompts, responses = [RICE_Q, CAPITAL_Q, "Tell me about tea."], [RICE, CAPITAL, "Tea is a drink made from leaves"]
    df = g.features(prompts, responses)
    assert list(df.columns) == ["qtype", "n_words", *ASSISTANT_WEIGHTS, "reward"]
    assert df["qtype"].tolist() == ["howto", "short_fact", "explain"]  # looked up; unknown -> explain
    composed = sum(w * df[name].to_numpy() for name, w in ASSISTANT_WEIGHTS.items())
    np.testing.assert_allclose(df["reward"].to_numpy(), composed, rtol=0, atol=1e-12)
    assert df["reward"].tolist() == g.score(prompts, responses).tolist()


def test_assistant_qtypes_override_and_validation():
    g = _gold("assistant")
    assert g.qtypes_for([RICE_Q, "unknown prompt"], ["list", None]) == ["list", "explain"]
    with pytest.raises(ValueError, match="unknown qtype 'poem' at index 0"):
        g.score([RICE_Q], [RICE], qtypes=["poem"])
    with pytest.raises(ValueError, match="unknown assistant reward weight"):
        AssistantGold(weights={"fluency": 1.0})


def test_assistant_relevance_reads_the_last_human_turn_of_a_dialogue():
    dialogue = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: " + RICE_Q + "\n\nAssistant:"
    g = _gold("assistant")
    assert g.relevance([dialogue], [RICE])[0] == pytest.approx(g.relevance([RICE_Q], [RICE])[0], abs=1e-6)


# ---- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sentiment", "assistant"])
def test_gold_rewards_are_deterministic_bit_for_bit(task):
    prompts = [RICE_Q, CAPITAL_Q, RICE_Q, "Write a short review of the film 'Jaws'."]
    responses = [RICE, CAPITAL, "", "A tense, brilliant thriller that still works today."]
    a = _gold(task).score(prompts, responses)
    b = _gold(task).score(prompts, responses)
    c = gold_reward(task).score(prompts, responses)  # a fresh instance
    assert a.tobytes() == b.tobytes() == c.tobytes()


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sentiment", "assistant"])
def test_bad_inputs_raise_clear_errors(task):
    g = _gold(task)
    with pytest.raises(ValueError, match="empty response list"):
        g.score([], [])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        g.score(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="sequence of strings"):
        g.score("a", "x")
    with pytest.raises(TypeError, match=r"responses\[1\] must be a str"):
        g.score(["a", "b"], ["x", None])


def test_nan_from_a_component_names_the_component_and_index(monkeypatch):
    g = AssistantGold()

    def nan_at_1(prompts, responses, **kw):
        out = np.zeros(len(responses))
        out[1] = np.nan
        return out

    monkeypatch.setattr(g, "relevance", nan_at_1)
    with pytest.raises(ValueError, match=r"'relevance' is nan \(not finite\) at index 1"):
        g.score([RICE_Q] * 3, [RICE, CAPITAL, RICE])

    s = SentimentGold()
    monkeypatch.setattr(s, "polarity", lambda responses, **kw: np.array([[0, 1, 0, 0.5], [0, 1, 0, np.nan]]))
    with pytest.raises(ValueError, match=r"'compound' is nan \(not finite\) at index 1"):
        s.score(["p", "p"], ["fine", "broken"])


def test_unknown_task_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"task 'hh' has no gold reward; tasks with one: 'sentiment', 'assistant'"):
        gold_reward("hh")


@pytest.mark.parametrize("task", ["sentiment", "assistant"])
def test_gold_rewards_satisfy_the_protocol(task):
    assert isinstance(_gold(task), RewardModel)


# ---- the pieces --------------------------------------------------------------------------------


def test_minilm_embeddings_are_unit_norm_and_similar_sentences_are_closer():
    e = embed(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e.shape == (3, 384) and e[0] @ e[1] > 0.6 > 0.2 > e[0] @ e[2]


def test_is_unfinished_cases():
    assert is_unfinished("Done.") == 0.0 and is_unfinished('He said "yes."') == 0.0 and is_unfinished("Why?") == 0.0
    assert is_unfinished("Simmer for ten minutes and") == 1.0 and is_unfinished("") == 1.0
    assert is_unfinished("Ingredients:") == 1.0 and is_unfinished("First, rinse the rice,") == 1.0
    assert is_unfinished("You need:\n- flour\n- eggs\n- milk", "list") == 0.0
    assert is_unfinished("You need:\n- flour\n- eggs and", "list") == 1.0
    assert is_unfinished("Steam curls from the cup\nthe morning wakes slow", "creative") == 0.0
    assert is_unfinished("Steam curls from the cup\nthe morning wakes slow", "explain") == 1.0
    assert is_unfinished("```python\nprint(1)\n```") == 0.0


def test_repetition_fraction_cases():
    assert repetition_fraction("") == 0.0 and repetition_fraction("one two") == 0.0
    assert repetition_fraction("the cat sat on the mat") == 0.0
    assert repetition_fraction("a b c a b c a b c") == pytest.approx(1 - 3 / 7)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 2000), lo=st.integers(0, 200), width=st.integers(0, 300))
def test_length_penalty_is_zero_inside_bounded_and_monotone_outside(n, lo, width):
    hi = lo + width
    p = length_penalty(n, lo, hi)
    assert 0.0 <= p <= 1.0
    if lo <= n <= hi:
        assert p == 0.0
    elif n > hi:
        assert length_penalty(n + 1, lo, hi) >= p
    else:
        assert length_penalty(max(n - 1, 0), lo, hi) >= p


def test_length_targets_cover_every_embedded_qtype():
    assert {r["qtype"] for r in load_prompts("assistant", "all")} == set(LENGTH_TARGETS)
    assert rewards.DEFAULT_QTYPE in LENGTH_TARGETS
