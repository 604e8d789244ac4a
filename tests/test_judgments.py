"""Judgments (vcb_lib.judgments): every failed feature writes its sentence with the values behind it,
a clean candidate gets the positive judgment, a bad template file fails naming the file, the key and
what is allowed, and an LLM can be the source."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_judge import FakeJudge, client

from vcb_lib.judgments import (
    TEMPLATES_PATH,
    JudgmentTemplateError,
    LLMJudgments,
    WhiteBoxJudgments,
    evidence_mask,
    judgments_fingerprint,
    load_templates,
    marked_html,
    quoted_words,
)

# A clean assistant answer's features (an "explain" question): every rule of judgments.yaml passes.
CLEAN = {"qtype": "explain", "n_words": 60, "empty": 0, "relevance": 0.62, "length_penalty": 0.0, "repetition": 0.0,
         "unfinished": 0.0, "copying": 0.0, "list_format": 0.0, "lo": 25, "hi": 120, "repeated": "", "n_repeated": 0,
         "ending": "\u201cto the pan.\u201d", "copy_share": 0.1, "list_items": 0, "is_list": 0}

# One failure at a time: the feature values that fail it, and what its sentence must say.
ASSISTANT_FAILURES = {
    "empty": ({"empty": 1, "n_words": 0, "relevance": 0.0, "length_penalty": 0.99, "unfinished": 1.0}, ["empty"]),
    "off_topic": ({"relevance": 0.12}, ["off-topic", "0.12"]),
    "too_short": ({"n_words": 8, "length_penalty": 0.74}, ["too short", "explain", "8 words", "25-120"]),
    "too_long": ({"n_words": 300, "length_penalty": 0.65}, ["too long", "300 words", "25-120"]),
    "repetition": ({"repetition": 0.4, "repeated": "\u201cthe rice is\u201d", "n_repeated": 1},
                   ["repeats itself", "\u201cthe rice is\u201d", "40%"]),
    "unfinished": ({"unfinished": 1.0, "ending": "\u201cadd the salt and\u201d"}, ["mid-sentence", "\u201cadd the salt and\u201d"]),
    "copying": ({"copying": 0.6, "copy_share": 0.8}, ["copies the question", "80%"]),
    "list_format": ({"qtype": "list", "is_list": 1, "list_items": 1, "lo": 20}, ["asks for a list", "1 list item"]),
}


@pytest.fixture(scope="module")
def assistant():
    return WhiteBoxJudgments("assistant")


def test_the_shipped_templates_load():
    t = load_templates()
    assert t.path == TEMPLATES_PATH and re.fullmatch(r"[0-9a-f]{16}", t.digest)
    assert {"instruction", "judgment"} <= set(re.findall(r"{(\w+)}", t.context))
    assert [r.name for r in t.tasks["assistant"].rules] == list(ASSISTANT_FAILURES)
    assert [r.name for r in t.tasks["sentiment"].rules] == ["empty", "negative", "neutral", "negative_words"]


def test_a_clean_candidate_gets_the_positive_judgment_with_its_values(assistant):
    j = assistant.judgment(CLEAN)
    assert j.positive and j.failed == () and j.text == assistant.positive_text
    assert j.values == CLEAN and j.source == "whitebox-assistant"


@pytest.mark.parametrize("feature", list(ASSISTANT_FAILURES))
def test_each_failed_assistant_feature_writes_its_sentence(assistant, feature):
    change, says = ASSISTANT_FAILURES[feature]
    j = assistant.judgment(CLEAN | change)
    assert not j.positive and j.failed == (feature,), j.failed
    sentence = load_templates().tasks["assistant"].rules[list(ASSISTANT_FAILURES).index(feature)].text.format(**CLEAN | change)
    assert j.text == sentence
    for piece in says:
        assert piece in j.text, (piece, j.text)
    assert j.values == CLEAN | change  # the feature values behind it


def test_several_failures_are_written_in_template_order(assistant):
    j = assistant.judgment(CLEAN | ASSISTANT_FAILURES["copying"][0] | ASSISTANT_FAILURES["off_topic"][0])
    assert j.failed == ("off_topic", "copying") and j.text.index("off-topic") < j.text.index("copies")


def test_assistant_features_from_real_text(assistant):
    """End to end through the gold reward's features (MiniLM for relevance): repeated 3-grams are quoted,
    a cut-off answer quotes its last words, an echo of the question is copying."""
    prompt = "How do I cook rice on the stove?"
    reps = "Rinse the rice well. Rinse the rice well. Rinse the rice well. Then cook the rice for"
    js = assistant.judge([prompt, prompt], [reps, "How do I cook rice on the stove?"])
    assert {"repetition", "unfinished"} <= set(js[0].failed)
    assert "\u201crinse the rice\u201d" in js[0].text and "\u201cthe rice for\u201d" not in js[0].text
    assert "\u201ccook the rice for\u201d" in js[0].text  # the last four words
    assert js[0].values["n_repeated"] >= 3 and js[0].values["repetition"] > 0.05
    assert "copying" in js[1].failed and js[1].values["copy_share"] == 1.0


def test_sentiment_judgments_from_vader():
    s = WhiteBoxJudgments("sentiment")
    js = s.judge(["p"] * 5, ["A wonderful, moving film.", "Dull, boring and far too long.", "It is a film.", "",
                             "Great acting, but the ending was awful."])
    assert js[0].positive and js[0].text == s.positive_text and js[0].values["compound"] > 0.05
    assert js[1].failed == ("negative", "negative_words")
    assert "\u201cDull\u201d (-1.7)" in js[1].text and "\u201cboring\u201d" in js[1].text
    assert f"{js[1].values['compound']:.2f}" in js[1].text
    assert js[2].failed == ("neutral",) and js[3].failed == ("empty",)
    assert "negative_words" in js[4].failed and "\u201cawful\u201d" in js[4].text  # a negative word in a mixed review
    assert js[4].values["n_negative_words"] == 1 and js[4].values["n_positive_words"] >= 1
    assert "\u201cawful\u201d (-3.0)" in js[4].text  # after "but": VADER weighs it 1.5 x its lexicon -2.0
    negated = s.judge(["p"] * 2, ["There is no doubt it is a fine film.", "It was not good at all."])
    assert "doubt" not in negated[0].values["negative_words"] and "\u201cdoubt\u201d" in negated[0].values["positive_words"]
    assert "\u201cgood\u201d (-1.4)" in negated[1].values["negative_words"]  # negated: VADER's -0.74 x 1.9


@pytest.mark.parametrize("text", ["There is no doubt it is a fine film.", "It was not good.", "A very dull, boring film.",
                                  "Great acting, but the ending was awful.", "I kind of liked it, never bad.", "Plain text."])
def test_word_valences_are_the_terms_vader_sums(text):
    """The quoted words' valences are VADER's own per-word terms: normalised, their sum is compound
    (texts without "!", "?" or emojis, which compound adds on top)."""
    import math

    from vcb_lib.rewards import gold_reward

    g = gold_reward("sentiment")
    total = sum(v for _, v in g.word_valences(text))
    assert total / math.sqrt(total * total + 15) == pytest.approx(g._analyzer.polarity_scores(text)["compound"], abs=1e-4)


# --------------------------------------------------------------------------------------------
# A bad template file fails with a clear error
# --------------------------------------------------------------------------------------------


def _write(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(TEMPLATES_PATH.read_text())
    edit(data)
    path = tmp_path / "judgments.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def _rule(data, task, name):
    return next(r for r in data[task]["rules"] if r["name"] == name)


BAD = {
    "unknown top key": (lambda d: d.update(sentimen={}), r"sentimen: unknown key; allowed: context, sentiment, assistant"),
    "missing task": (lambda d: d.pop("assistant"), r"assistant: missing; the file needs context, sentiment, assistant"),
    "context without judgment": (lambda d: d.update(context="{instruction}"), r"context: must contain \{judgment\}"),
    "context unknown placeholder": (lambda d: d.update(context="{instruction} {judgment} {reward}"),
                                    r"context: unknown placeholder \{reward\}; allowed: \{instruction\}, \{judgment\}"),
    "positive with a placeholder": (lambda d: d["sentiment"].update(positive="Positive ({compound:.2f})."),
                                    r"sentiment.positive: must be plain text without placeholders .* found \{compound\}"),
    "unknown field in when": (lambda d: _rule(d, "assistant", "off_topic").update(when=[["relevence", "<", 0.3]]),
                              r"assistant.rules\[1\] \(off_topic\).when\[0\]: unknown numeric field 'relevence'; "
                              r"allowed: n_words, empty, relevance"),
    "text field in when": (lambda d: _rule(d, "assistant", "off_topic").update(when=[["qtype", "==", 1]]),
                           r"assistant.rules\[1\] \(off_topic\).when\[0\]: unknown numeric field 'qtype'"),
    "unknown operator": (lambda d: _rule(d, "sentiment", "negative").update(when=[["compound", "=<", 0]]),
                         r"sentiment.rules\[1\] \(negative\).when\[0\]: unknown operator '=<'; allowed: <, <=, >, >=, ==, !="),
    "bad value": (lambda d: _rule(d, "sentiment", "negative").update(when=[["compound", "<", "zero"]]),
                  r"sentiment.rules\[1\] \(negative\).when\[0\]: value must be a finite number or a numeric field"),
    "condition not a triple": (lambda d: _rule(d, "sentiment", "negative").update(when=[["compound", "<"]]),
                               r"sentiment.rules\[1\] \(negative\).when\[0\]: must be \[field, op, value\]"),
    "unknown placeholder in text": (lambda d: _rule(d, "sentiment", "neutral").update(text="Meh ({score})."),
                                    r"sentiment.rules\[2\] \(neutral\).text: unknown field \{score\}; allowed: n_words"),
    "bad format spec": (lambda d: _rule(d, "sentiment", "neutral").update(text="Meh ({compound:.2q})."),
                        r"sentiment.rules\[2\] \(neutral\).text: cannot be filled \(ValueError"),
    "duplicate rule name": (lambda d: _rule(d, "sentiment", "neutral").update(name="negative"),
                            r"sentiment.rules\[2\].name: 'negative' is used twice"),
    "rule with an extra key": (lambda d: _rule(d, "sentiment", "neutral").update(weight=2),
                               r"sentiment.rules\[2\]: must be a mapping with exactly the keys name, when, text"),
    "empty rules": (lambda d: d["assistant"].update(rules=[]), r"assistant.rules: must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_template_file_names_the_file_the_key_and_what_is_allowed(tmp_path, case):
    edit, message = BAD[case]
    path = _write(tmp_path, edit)
    with pytest.raises(JudgmentTemplateError, match=re.escape(str(path)) + ": " + message):
        load_templates(path)


def test_a_missing_or_unparsable_file_is_named(tmp_path):
    with pytest.raises(JudgmentTemplateError, match=re.escape(str(tmp_path / "none.yaml")) + ": no such judgment template file"):
        load_templates(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("context: [unclosed\n")
    with pytest.raises(JudgmentTemplateError, match=re.escape(str(broken)) + ": not valid YAML"):
        load_templates(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(JudgmentTemplateError, match="top level: must be a mapping with the keys context, sentiment, assistant"):
        load_templates(listed)


def test_an_edited_template_changes_what_the_sources_record(tmp_path):
    path = _write(tmp_path, lambda d: d["sentiment"].update(positive="A glowing review."))
    edited = WhiteBoxJudgments("sentiment", load_templates(path))
    assert edited.positive_text == "A glowing review."
    assert edited.fingerprint() != WhiteBoxJudgments("sentiment").fingerprint()
    assert WhiteBoxJudgments("sentiment").fingerprint() == judgments_fingerprint("sentiment")
    with pytest.raises(ValueError, match="no white-box judgments for task 'hh'; tasks with them: sentiment, assistant"):
        WhiteBoxJudgments("hh")


# --------------------------------------------------------------------------------------------
# Another source: an LLM judge behind the OpenAI-compatible client
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_judge():
    fake = FakeJudge()
    yield fake
    fake.close()


def test_llm_judgments_read_the_verdict(fake_judge):
    from vcb_lib.judge import JudgeReplyError

    source = LLMJudgments(client(fake_judge))
    fake_judge.script = ["Nothing wrong here.\nVerdict: good", "It is rude: \u201cgo away\u201d.\nVerdict: bad",
                         "I cannot decide."]
    good, bad = source.judge(["q1", "q2"], ["fine answer", "go away"])
    assert good.positive and good.text == source.positive_text and good.values["critique"] == "Nothing wrong here."
    assert not bad.positive and bad.text == "It is rude: \u201cgo away\u201d." and bad.failed == ("llm",)
    assert bad.source == "llm-fake-gpt-4" and quoted_words(bad.text) == {"go", "away"}
    sent = fake_judge.requests[1]["body"]["messages"][0]["content"]
    assert "Instruction: q2\nResponse: go away" in sent
    with pytest.raises(JudgeReplyError, match=re.escape("judgment 0: the reply has no 'Verdict: good|bad' line")):
        source.judge(["q3"], ["?"])


def test_evidence_and_highlighting():
    judgment = "It uses negative words: \u201cDull\u201d (-1.7), \u201cboring\u201d (-1.3)."
    tokens = [" The", " dull", ",", " boring", " film", " <b>"]
    assert quoted_words(judgment) == {"dull", "boring"}
    assert evidence_mask(tokens, judgment) == [False, True, False, True, False, False]
    assert evidence_mask(tokens, "The review is clearly positive.") == [False] * 6
    html = marked_html(tokens, [False, True, False, False, True, True], evidence_mask(tokens, judgment))
    assert html == " The<mark><u> dull</u></mark>,<u> boring</u><mark> film</mark><mark> &lt;b&gt;</mark>"


def test_training_cut_judge_has_a_model_write_cut_judgments(fake_judge, tmp_path):
    """``training.cut_judge``: a URL (here the fake server) writes D_t's judgments for CUT; its keys enter
    CUT's artefact key and folder name (``llmjudge``, never the URL), and no other method's."""
    import pandas as pd

    from vcb_lib.config import ConfigError, load_params
    from vcb_lib.stages import artefacts
    from vcb_lib.stages.train import judged_candidates

    smoke = Path(__file__).parents[1] / "params" / "smoke.yaml"
    cfg = load_params(smoke, [f"training.cut_judge={fake_judge.url}", "training.cut_judge_model=fake-gpt-4",
                              "evaluation.judge_workers=1", f"run.output_root={tmp_path}", "models.sft=false"])
    white = load_params(smoke, [f"run.output_root={tmp_path}", "models.sft=false"])  # π_sft = the tiny model itself
    table = pd.DataFrame({"prompt": ["Review a film.", "Review a play."], "response": ["Dull and boring.", "Lovely."],
                          "model_input": ["<x>", "<y>"]})
    fake_judge.script = ["It is negative: \u201cdull\u201d, \u201cboring\u201d.\nVerdict: bad", "Fine.\nVerdict: good"]
    path = judged_candidates(cfg, table, tmp_path / "judged.parquet", log=lambda line: None)
    judged = pd.read_parquet(path)
    assert list(judged.judgment_positive) == [False, True] and list(judged.judgment_source) == ["llm-fake-gpt-4"] * 2
    assert judged.judgment[0] == "It is negative: \u201cdull\u201d, \u201cboring\u201d." and "Review a film." in judged.judged_input[0]
    assert fake_judge.requests[0]["body"]["model"] == "fake-gpt-4"
    key, white_key = artefacts.method_key(cfg, "cut"), artefacts.method_key(white, "cut")
    assert key["judgments"].startswith("llm:") and white_key["judgments"].startswith("whitebox-")
    assert key["training.cut_judge"] == fake_judge.url and white_key["training.cut_judge"] == ""
    assert artefacts.method_dir_name(cfg, "cut") == artefacts.method_dir_name(white, "cut").replace("-seed", "-llmjudge-seed")
    assert artefacts.method_key(cfg, "vcb") == artefacts.method_key(white, "vcb")  # VCB never retrains for CUT's judge
    with pytest.raises(ConfigError, match="training.cut_judge_model: is empty but training.cut_judge is a URL"):
        load_params(smoke, ["training.cut_judge=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match=r"training.cut_judge: must be empty \(the white-box judgments\), local, or"):
        load_params(smoke, ["training.cut_judge=judge.example.com"])
