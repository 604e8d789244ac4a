"""Evaluation metrics (vcb_lib.evaluate): hand-computed examples, independent cross-checks, and a
fake OpenAI-compatible judge server on 127.0.0.1."""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import BLEU

from vcb_lib import evaluate as ev
from vcb_lib import theory

# --------------------------------------------------------------------------------------------
# Win rate (Table 2)
# --------------------------------------------------------------------------------------------


def test_identical_policy_ties_everything_and_has_win_rate_one_half():
    r = np.random.default_rng(0).normal(size=(50, 4))
    out = ev.win_rate(r, r.copy())
    assert (out["win"], out["tie"], out["lose"]) == (0.0, 1.0, 0.0)
    assert out["win_rate"] == 0.5 and out["win_minus_lose"] == 0.0
    assert out["win_rate_ci"] == [0.5, 0.5] and out["win_minus_lose_ci"] == [0.0, 0.0]
    assert out["n_prompts"] == 50 and out["n_pairs"] == 200


def test_same_distribution_ci_contains_half_and_shifted_one_excludes_it():
    # a policy equal to π_sft, sampled independently: rewards of both come from the same distribution
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=400), rng.normal(size=400)
    out = ev.win_rate(a, b, seed=3)
    lo, hi = out["win_rate_ci"]
    assert lo < 0.5 < hi
    assert lo <= out["win_rate"] <= hi
    lo2, hi2 = out["win_minus_lose_ci"]
    assert lo2 <= out["win_minus_lose"] <= hi2
    # a clearly better policy: CI above 1/2
    better = ev.win_rate(a + 1.0, b, seed=3)
    assert better["win_rate_ci"][0] > 0.6


def test_always_higher_wins_with_degenerate_ci():
    b = np.random.default_rng(2).normal(size=(30, 3))
    out = ev.win_rate(b + 1e-3, b)
    assert out["win_rate"] == 1.0 and out["win"] == 1.0 and out["win_minus_lose"] == 1.0
    assert out["win_rate_ci"] == [1.0, 1.0]
    assert ev.win_rate(b, b + 1e-3)["win_rate"] == 0.0


def test_win_rate_hand_example_index_and_all_pairings():
    a = np.array([[3.0, 1.0], [2.0, 2.0]])
    b = np.array([[1.0, 2.0], [2.0, 0.0]])
    # index pairs: (3>1 win) (1<2 lose) (2=2 tie) (2>0 win) -> win 2/4, tie 1/4, lose 1/4
    out = ev.win_rate(a, b, bootstrap=0)
    assert (out["win"], out["tie"], out["lose"]) == (0.5, 0.25, 0.25)
    assert out["win_rate"] == pytest.approx(0.625) and out["win_minus_lose"] == pytest.approx(0.25)
    assert out["win_rate_ci"] is None
    # all pairs: prompt 0: 3>1 W, 3>2 W, 1=1 T, 1<2 L; prompt 1: 2=2 T, 2>0 W, 2=2 T, 2>0 W
    # -> wins 2+2 = 4, ties 1+2 = 3, losses 1 -> 4/8, 3/8, 1/8
    out = ev.win_rate(a, b, bootstrap=0, pairing="all")
    assert (out["win"], out["tie"], out["lose"]) == (0.5, 0.375, 0.125)
    assert out["n_pairs"] == 8
    # tie tolerance: |3-1|,|1-2|,|2-2|,|2-0| with tol 1 -> only 2 and 2 exceed -> wins 2/4, ties 2/4
    out = ev.win_rate(a, b, bootstrap=0, tie_tol=1.0)
    assert (out["win"], out["tie"], out["lose"]) == (0.5, 0.5, 0.0)


def test_bootstrap_reproducible_with_seed():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(60, 2)), rng.normal(size=(60, 2))
    x, y, z = ev.win_rate(a, b, seed=7), ev.win_rate(a, b, seed=7), ev.win_rate(a, b, seed=8)
    assert x["win_rate_ci"] == y["win_rate_ci"] and x["win_minus_lose_ci"] == y["win_minus_lose_ci"]
    assert x["win_rate_ci"] != z["win_rate_ci"]
    assert x["win_rate"] == z["win_rate"]  # the point estimate does not depend on the seed
    assert ev.bootstrap_mean_ci(np.arange(10.0), seed=1) == ev.bootstrap_mean_ci(np.arange(10.0), seed=1)


def test_bootstrap_matches_a_plain_loop():
    """Independent implementation of the percentile bootstrap over prompts."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=25), rng.normal(size=25)
    per_prompt = (a > b) + 0.5 * (a == b)
    gen = np.random.default_rng(11)
    boots = [per_prompt[gen.integers(0, 25, size=25)].mean() for _ in range(200)]
    want = np.quantile(boots, [0.05, 0.95])
    got = ev.win_rate(a, b, bootstrap=200, seed=11, ci=0.9)["win_rate_ci"]
    np.testing.assert_allclose(got, want)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=20))
def test_win_rate_is_antisymmetric(pairs):
    a, b = np.array(pairs, dtype=float).T
    ab, ba = ev.win_rate(a, b, bootstrap=0), ev.win_rate(b, a, bootstrap=0)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    assert ab["win"] == ba["lose"] and ab["tie"] == pytest.approx(ba["tie"])
    assert ab["win"] + ab["tie"] + ab["lose"] == pytest.approx(1.0)


@pytest.mark.parametrize("a, b, match", [
    (np.zeros(3), np.zeros(4), "shape"),
    (np.zeros((3, 2)), np.zeros((3, 3)), "shape"),
    (np.zeros(0), np.zeros(0), "empty"),
    (np.array([1.0, np.nan]), np.zeros(2), "NaN"),
    (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), "1-D or 2-D"),
])
def test_win_rate_rejects_bad_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        ev.win_rate(a, b)


def test_win_rate_accepts_torch_and_all_pairing_with_different_k():
    out = ev.win_rate(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0]]), pairing="all", bootstrap=0)
    assert (out["win"], out["tie"], out["lose"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


# --------------------------------------------------------------------------------------------
# KL and reward vs KL (Figure 5)
# --------------------------------------------------------------------------------------------


def test_identical_policy_has_zero_kl():
    lp = np.random.default_rng(0).normal(-20, 5, size=(40, 4))
    out = ev.kl_estimate(lp, lp.copy())
    assert out == {"kl": 0.0, "kl_se": 0.0, "kl_k3": 0.0, "n_prompts": 40, "n_samples": 160}


def test_kl_monte_carlo_matches_exact_categorical_kl():
    rng = np.random.default_rng(0)
    logits_pi, logits_sft = rng.normal(size=6) * 2, rng.normal(size=6)
    log_pi = logits_pi - np.logaddexp.reduce(logits_pi)
    log_sft = logits_sft - np.logaddexp.reduce(logits_sft)
    exact = float(np.sum(np.exp(log_pi) * (log_pi - log_sft)))
    y = rng.choice(6, size=(2000, 2), p=np.exp(log_pi))  # samples from π
    out = ev.kl_estimate(log_pi[y], log_sft[y])
    assert abs(out["kl"] - exact) < 4 * out["kl_se"]
    assert out["kl_k3"] == pytest.approx(exact, abs=0.1)
    # the SE is over prompts: std of the per-prompt means / sqrt(N)
    per_prompt = (log_pi[y] - log_sft[y]).mean(1)
    assert out["kl_se"] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(2000))
    # sampling from π_sft instead would give -KL(π_sft‖π): the sign convention matters
    y_sft = rng.choice(6, size=4000, p=np.exp(log_sft))
    assert ev.kl_estimate(log_pi[y_sft], log_sft[y_sft])["kl"] < 0


def test_reward_kl_point_hand_example():
    rewards = np.array([[1.0, 3.0], [2.0, 6.0]])  # per-prompt means 2, 4
    pol = np.array([[-1.0, -2.0], [-3.0, -4.0]])
    ref = np.array([[-2.0, -2.0], [-3.0, -6.0]])  # log-ratios [1, 0], [0, 2] -> per-prompt .5, 1
    out = ev.reward_kl_point(rewards, pol, ref)
    assert out["mean_reward"] == 3.0 and out["reward_se"] == pytest.approx(np.std([2, 4], ddof=1) / math.sqrt(2))
    assert out["kl"] == 0.75 and out["kl_se"] == pytest.approx(np.std([0.5, 1.0], ddof=1) / math.sqrt(2))
    with pytest.raises(ValueError, match="shape"):
        ev.reward_kl_point(rewards[:1], pol, ref)
    with pytest.raises(ValueError, match="shape"):
        ev.kl_estimate(pol, ref[:, :1])


# --------------------------------------------------------------------------------------------
# Misalignment (A.5)
# --------------------------------------------------------------------------------------------


def test_misalignment_wrapper_agrees_with_theory():
    rng = np.random.default_rng(0)
    pol, ref, r = rng.normal(size=(10, 8)), rng.normal(size=(10, 8)), rng.normal(size=(10, 8))
    out = ev.misalignment(pol, ref, r)
    pooled, per = theory.misalignment_rate(pol, ref, r, per_prompt=True)
    assert out["misalignment_rate"] == pytest.approx(pooled)
    assert out["per_prompt_mean"] == pytest.approx(float(np.mean(per)))
    assert out["n_prompts_with_pairs"] == 10
    # hand example, one prompt: rewards 1 < 2 < 3, log-ratios 0, 2, 1 -> pairs (1,2) ok, (1,3) ok, (2,3) misaligned
    hand = ev.misalignment(np.array([[0.0, 2.0, 1.0]]), np.zeros((1, 3)), np.array([[1.0, 2.0, 3.0]]))
    assert hand["misalignment_rate"] == pytest.approx(1 / 3)
    # prompts with different pair counts (mask): prompt 0 as above, 1 of 3 pairs misaligned; prompt 1 keeps
    # 2 responses, rewards 1 < 2 with log-ratios 1 > 0 -> its 1 pair misaligned.
    # pooled (Table 6) = (1 + 1) / (3 + 1) = 0.5; mean of per-prompt rates = (1/3 + 1) / 2 = 2/3
    masked = ev.misalignment(np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 9.0]]), np.zeros((2, 3)),
                             np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), mask=np.array([[1, 1, 1], [1, 1, 0]], bool))
    assert masked["misalignment_rate"] == pytest.approx(0.5) and masked["per_prompt_mean"] == pytest.approx(2 / 3)
    # perfectly calibrated policy: log-ratio = reward -> no misalignment
    assert ev.misalignment(r, np.zeros_like(r), r)["misalignment_rate"] == 0.0


# --------------------------------------------------------------------------------------------
# Diversity (A.8)
# --------------------------------------------------------------------------------------------


def test_distinct_n_hand_example():
    texts = ["The cat sat.", "the cat ran"]
    # tokens: [the, cat, sat, .], [the, cat, ran]
    # unigrams: 7 total, distinct {the, cat, sat, ., ran} = 5 -> 5/7
    assert ev.distinct_n(texts, 1) == pytest.approx(5 / 7)
    # bigrams (not across texts): (the cat) (cat sat) (sat .) | (the cat) (cat ran) -> 4 distinct / 5
    assert ev.distinct_n(texts, 2) == pytest.approx(4 / 5)
    assert ev.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # token ids used as is
    with pytest.raises(ValueError, match="no 3-gram"):
        ev.distinct_n(["a b", "c"], 3)


def test_ead_hand_example():
    texts = ["the cat sat", "the cat ran"]
    # C = 6 unigrams, N = 4 distinct (the, cat, sat, ran), V = 10:
    # expected distinct = 10 * (1 - 0.9**6) = 10 * (1 - 0.531441) = 4.68559
    # EAD = 4 / 4.68559 = 0.853681...
    assert ev.ead(texts, 1, vocab_size=10) == pytest.approx(0.8536811799581)
    # bigrams: (the cat) x2, (cat sat), (cat ran): C = 4, N = 3; 10 * (1 - 0.9**4) = 3.439 -> 0.872346...
    assert ev.ead(texts, 2, vocab_size=10) == pytest.approx(3 / 3.439)
    # huge V: the denominator tends to C, so EAD -> distinct-n
    assert ev.ead(texts, 1, vocab_size=10**12) == pytest.approx(ev.distinct_n(texts, 1), rel=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        ev.ead(texts, 1, vocab_size=1)


def test_self_bleu_identical_is_one_and_disjoint_is_zero():
    same = [["the cat sat on the mat"] * 4, ["a b c d"] * 3]
    assert ev.self_bleu(same, 2) == pytest.approx(1.0)
    assert ev.self_bleu(same, 3) == pytest.approx(1.0)
    disjoint = [["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]]
    assert ev.self_bleu(disjoint, 2) == 0.0


def test_self_bleu_hand_value_and_sacrebleu_cross_check():
    group = ["the cat sat", "the cat ran"]
    # each sentence vs the other: unigram p1 = 2/3 (the, cat), bigram p2 = 1/2 (the cat), equal lengths -> BP 1
    # BLEU-2 = sqrt(2/3 * 1/2) = 1/sqrt(3) = 0.57735
    assert ev.self_bleu([group], 2) == pytest.approx(1 / math.sqrt(3))
    # BLEU-3: no trigram match -> floor smoothing p3 = 0.1/1; (2/3 * 1/2 * 0.1) ** (1/3) = (1/30) ** (1/3)
    assert ev.self_bleu([group], 3) == pytest.approx((1 / 30) ** (1 / 3))

    groups = [["the cat sat on the mat", "a cat sat on a mat", "the dog lay on the rug"],
              ["I like green tea", "I like black tea a lot"]]
    for n in (2, 3):
        bleu = BLEU(max_ngram_order=n, effective_order=True, smooth_method="floor", smooth_value=0.1)
        per_prompt = [np.mean([bleu.sentence_score(h, g[:i] + g[i + 1:]).score for i, h in enumerate(g)])
                      for g in groups]
        want = np.mean(per_prompt) / 100
        assert ev.self_bleu(groups, n) == pytest.approx(want)
        assert 0.0 < want < 1.0
    # prompts weigh equally: the mean of the two one-prompt values
    assert ev.self_bleu(groups, 2) == pytest.approx((ev.self_bleu(groups[:1], 2) + ev.self_bleu(groups[1:], 2)) / 2)


def test_self_bleu_rejects_bad_groups():
    with pytest.raises(ValueError, match=">= 2 samples"):
        ev.self_bleu([["only one"]], 2)
    with pytest.raises(TypeError):
        ev.self_bleu(["a b", "c d"], 2)


def test_diversity_row():
    groups = [["the cat sat", "the cat ran"], ["a b", "a b"]]
    row = ev.diversity(groups, vocab_size=10)
    assert row["ead"] == pytest.approx((ev.ead(groups[0], vocab_size=10) + ev.ead(groups[1], vocab_size=10)) / 2)
    assert row["ead_pooled"] == pytest.approx(ev.ead(groups[0] + groups[1], vocab_size=10))
    assert row["distinct_2"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert set(row) == {"ead", "ead_pooled", "distinct_1", "distinct_2", "self_bleu_2", "self_bleu_3"}


# --------------------------------------------------------------------------------------------
# Length (A.7)
# --------------------------------------------------------------------------------------------


def test_length_stats():
    out = ev.length_stats(np.array([[1, 2, 3], [4, 100, 3]]))
    # sorted 1 2 3 3 4 100: mean 113/6, median 3, q1 at position 1.25 -> 2.25, q3 at 3.75 -> 3.75
    assert out["n"] == 6 and out["mean"] == pytest.approx(113 / 6)
    assert (out["q1"], out["median"], out["q3"], out["min"], out["max"]) == (2.25, 3.0, 3.75, 1.0, 100.0)
    with pytest.raises(ValueError):
        ev.length_stats([])
    with pytest.raises(ValueError):
        ev.length_stats([-1, 2])


# --------------------------------------------------------------------------------------------
# LLM judge (A.3) against a fake OpenAI-compatible server on 127.0.0.1
# --------------------------------------------------------------------------------------------


class FakeJudge:
    """Serves POST /v1/chat/completions from a script of replies (str -> assistant text, int -> that
    HTTP status); records every request body and header. Answers 500 once the script is used up."""

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body})
                fake.headers.append(dict(self.headers))
                reply = fake.script.pop(0) if fake.script else 500
                if isinstance(reply, int):
                    data, code = b'{"error": "scripted failure"}', reply
                else:
                    data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                            "content": reply}}]}).encode()
                    code = 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_judge():
    fake = FakeJudge()
    yield fake
    fake.close()


def client(fake, **kw):
    return ev.JudgeClient(fake.url, "fake-gpt-4", timeout=5, max_retries=0, retry_wait=0.0, **kw)


def test_consistent_win_in_both_orders_scores_one(fake_judge):
    fake_judge.script = ["Reason: A is kinder.\nResult: A", "Reason: B is kinder.\nResult: B"]
    score = ev.judge_pair_both_orders(client(fake_judge), "Human: hi", "vcb answer", "dpo answer", "dialogue")
    assert score == 1.0
    first, second = (r["body"]["messages"][0]["content"] for r in fake_judge.requests)
    # run 1 shows method 1 as A, run 2 as B; the prompt is the A.3 text with the slots filled
    assert first == ev.JUDGE_PROMPTS["dialogue"].format(prompt="Human: hi", response_a="vcb answer",
                                                        response_b="dpo answer")
    assert first.startswith("As an impartial judge, your role is to evaluate the responses given by two AI assistants")
    assert "Dialogue: Human: hi\nResponse A: vcb answer\nResponse B: dpo answer" in first
    assert "Response A: dpo answer\nResponse B: vcb answer" in second
    assert first.endswith("Reason: {one-sentence.}\nResult: {A or B or C.}")
    assert fake_judge.requests[0]["path"] == "/v1/chat/completions"
    assert fake_judge.requests[0]["body"]["model"] == "fake-gpt-4"


def test_inconsistent_verdicts_are_a_tie_and_ties_average(fake_judge):
    c = client(fake_judge)
    fake_judge.script = ["Result: A", "Result: A"]  # position bias: A wins whatever it is
    assert ev.judge_pair_both_orders(c, "p", "x", "y", "summary") == 0.5
    fake_judge.script = ["Result: B", "Result: A"]  # consistent loss
    assert ev.judge_pair_both_orders(c, "p", "x", "y", "summary") == 0.0
    fake_judge.script = ["Result: A", "Result: C"]  # win, then tie
    assert ev.judge_pair_both_orders(c, "p", "x", "y", "summary") == 0.75
    assert "SUBREDDIT post: p\nsummary A: x\nsummary B: y" in fake_judge.requests[0]["body"]["messages"][0]["content"]


def test_malformed_reply_raises_or_counts_as_tie(fake_judge):
    c = client(fake_judge)
    fake_judge.script = ["I cannot decide.", "Result: B"]
    with pytest.raises(ev.JudgeReplyError, match="Result"):
        ev.judge_pair_both_orders(c, "p", "x", "y", "dialogue")
    fake_judge.script = ["I cannot decide.", "Result: B"]  # malformed run -> C (0.5); run 2 B -> 1
    assert ev.judge_pair_both_orders(c, "p", "x", "y", "dialogue", on_malformed="tie") == 0.75


def test_judge_win_rate(fake_judge):
    fake_judge.script = ["Result: A", "Result: B",   # prompt 0: consistent win -> 1
                         "Result: A", "Result: A",   # prompt 1: inconsistent -> 0.5 (tie)
                         "Result: B", "Result: A",   # prompt 2: consistent loss -> 0
                         "garbage", "Result: B"]     # prompt 3: malformed + B -> 0.75 (win)
    out = ev.judge_win_rate(client(fake_judge), ["p0", "p1", "p2", "p3"], ["a0", "a1", "a2", "a3"],
                            ["b0", "b1", "b2", "b3"], "dialogue", on_malformed="tie", bootstrap=200)
    assert out["scores"] == [1.0, 0.5, 0.0, 0.75]
    assert (out["win"], out["tie"], out["lose"]) == (0.5, 0.25, 0.25)
    assert out["win_rate"] == pytest.approx(2.25 / 4) and out["win_minus_lose"] == 0.25
    assert out["n_malformed"] == 1 and out["verdicts"][3] == ["?", "B"]
    assert out["win_rate_ci"][0] <= out["win_rate"] <= out["win_rate_ci"][1]
    assert len(fake_judge.requests) == 8
    with pytest.raises(ValueError, match="unknown judge kind"):
        ev.judge_win_rate(client(fake_judge), ["p"], ["a"], ["b"], "poetry")
    with pytest.raises(ValueError, match="lengths differ"):
        ev.judge_win_rate(client(fake_judge), ["p"], ["a", "b"], ["b"], "dialogue")
    assert len(fake_judge.requests) == 8  # no request for invalid calls


def test_client_url_auth_and_retries(fake_judge):
    fake_judge.script = [503, "Result: C"]
    c = ev.JudgeClient(fake_judge.url + "/v1/", "m", api_key="sk-test", timeout=5, max_retries=1, retry_wait=0.0)
    assert c.judge("p", "x", "y", "dialogue") == "C"
    assert [r["path"] for r in fake_judge.requests] == ["/v1/chat/completions"] * 2
    assert fake_judge.headers[-1]["Authorization"] == "Bearer sk-test"
    assert "sk-test" not in repr(c)
    fake_judge.script = [400]
    with pytest.raises(RuntimeError, match="HTTP 400"):
        c.judge("p", "x", "y", "dialogue")


@pytest.mark.parametrize("reply, verdict", [
    ("Reason: both fine.\nResult: C", "C"),
    ("Reason: x.\n**Result:** {B.}", "B"),
    ("Result: {A or B or C.}\nReason: y.\nResult: A", "A"),  # the echoed template is skipped
    ("Result: Assistant B", "B"),
])
def test_parse_verdict(reply, verdict):
    assert ev.parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply", ["A is better", "Result: Both", "Result: {A or B or C.}", ""])
def test_parse_verdict_rejects(reply):
    with pytest.raises(ev.JudgeReplyError):
        ev.parse_verdict(reply)


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
