"""The LLM judge (vcb_lib.judge) against a fake OpenAI-compatible judge server on 127.0.0.1."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vcb_lib import judge

# --------------------------------------------------------------------------------------------
# LLM judge (A.3) against a fake OpenAI-compatible server on 127.0.0.1
# --------------------------------------------------------------------------------------------


class FakeJudge:
    """Serves POST /v1/chat/completions from a script of replies (str -> assistant text, int -> that
    HTTP status, (status, body[, reason phrase]) -> that raw answer); "{authorization}" in a reply is
    replaced by the request's Authorization header (a server that echoes it). Records every request
    body and header. Answers 500 once the script is used up."""

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
                echo = lambda text: text.replace("{authorization}", self.headers.get("Authorization", ""))  # noqa: E731
                reason = None
                if isinstance(reply, int):
                    data, code = b'{"error": "scripted failure"}', reply
                elif isinstance(reply, tuple):
                    code, data, reason = reply[0], echo(reply[1]).encode(), echo(reply[2]) if len(reply) > 2 else None
                else:
                    data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                            "content": echo(reply)}}]}).encode()
                    code = 200
                self.send_response(code, reason)
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
    return judge.JudgeClient(fake.url, "fake-gpt-4", timeout=5, max_retries=0, retry_wait=0.0, **kw)


def test_consistent_win_in_both_orders_scores_one(fake_judge):
    fake_judge.script = ["Reason: A is kinder.\nResult: A", "Reason: B is kinder.\nResult: B"]
    score = judge.judge_pair_both_orders(client(fake_judge), "Human: hi", "vcb answer", "dpo answer", "dialogue")
    assert score == 1.0
    first, second = (r["body"]["messages"][0]["content"] for r in fake_judge.requests)
    # run 1 shows method 1 as A, run 2 as B; the prompt is the A.3 text with the slots filled
    assert first == judge.JUDGE_PROMPTS["dialogue"].format(prompt="Human: hi", response_a="vcb answer",
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
    assert judge.judge_pair_both_orders(c, "p", "x", "y", "summary") == 0.5
    fake_judge.script = ["Result: B", "Result: A"]  # consistent loss
    assert judge.judge_pair_both_orders(c, "p", "x", "y", "summary") == 0.0
    fake_judge.script = ["Result: A", "Result: C"]  # win, then tie
    assert judge.judge_pair_both_orders(c, "p", "x", "y", "summary") == 0.75
    assert "SUBREDDIT post: p\nsummary A: x\nsummary B: y" in fake_judge.requests[0]["body"]["messages"][0]["content"]


def test_malformed_reply_raises_or_leaves_the_pair_unscored(fake_judge):
    c = client(fake_judge)
    fake_judge.script = ["I cannot decide.", "Result: B"]
    with pytest.raises(judge.JudgeReplyError, match="Result"):
        judge.judge_pair_both_orders(c, "p", "x", "y", "dialogue")
    fake_judge.script = ["I cannot decide.", "Result: B"]  # no verdict in run 1: no score (never a tie, 0.75)
    assert judge.judge_pair_both_orders(c, "p", "x", "y", "dialogue", on_malformed="exclude") is None
    with pytest.raises(ValueError, match="'tie' is gone.*exclude"):
        judge.judge_pair_both_orders(c, "p", "x", "y", "dialogue", on_malformed="tie")


def test_judge_win_rate(fake_judge):
    fake_judge.script = ["Result: A", "Result: B",   # prompt 0: consistent win -> 1
                         "Result: A", "Result: A",   # prompt 1: inconsistent -> 0.5 (tie)
                         "Result: B", "Result: A",   # prompt 2: consistent loss -> 0
                         "garbage", "Result: B"]     # prompt 3: malformed + B -> excluded
    out = judge.judge_win_rate(client(fake_judge), ["p0", "p1", "p2", "p3"], ["a0", "a1", "a2", "a3"],
                            ["b0", "b1", "b2", "b3"], "dialogue", on_malformed="exclude", bootstrap=200)
    assert out["scores"] == [1.0, 0.5, 0.0, None]
    assert (out["win"], out["tie"], out["lose"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert out["win_rate"] == pytest.approx(1.5 / 3) and out["win_minus_lose"] == 0.0
    assert (out["n"], out["n_judged"], out["n_excluded"], out["n_malformed"]) == (4, 3, 1, 1)
    assert out["verdicts"][3] == ["?", "B"]
    assert out["consistent"] == pytest.approx(2 / 3) and out["same_position"] == pytest.approx(1 / 3)  # judged only
    assert out["win_rate_ci"][0] <= out["win_rate"] <= out["win_rate_ci"][1]
    assert len(fake_judge.requests) == 8
    with pytest.raises(ValueError, match="'tie' is gone"):
        judge.judge_win_rate(client(fake_judge), ["p"], ["a"], ["b"], "dialogue", on_malformed="tie")
    with pytest.raises(ValueError, match="unknown judge kind"):
        judge.judge_win_rate(client(fake_judge), ["p"], ["a"], ["b"], "poetry")
    with pytest.raises(ValueError, match="lengths differ"):
        judge.judge_win_rate(client(fake_judge), ["p"], ["a", "b"], ["b"], "dialogue")
    assert len(fake_judge.requests) == 8  # no request for invalid calls


def test_a_malformed_reply_is_excluded_from_the_win_rate_not_a_tie(fake_judge):
    """Two consistent wins and two prompts with a malformed reply: the win rate is 1 over the two
    judged prompts (as a tie, each malformed prompt would have scored 0.75 or 0.5, and the rate 0.8125),
    and the malformed prompts are counted beside it. With every reply malformed nothing is left to rate."""
    fake_judge.script = ["Result: A", "Result: B",      # prompt 0: consistent win
                         "Result: A", "no verdict",     # prompt 1: malformed in the swapped order
                         "Result: A", "Result: B",      # prompt 2: consistent win
                         "I refuse.", "Nope."]          # prompt 3: malformed twice
    out = judge.judge_win_rate(client(fake_judge), ["p0", "p1", "p2", "p3"], ["a0", "a1", "a2", "a3"],
                               ["b0", "b1", "b2", "b3"], "dialogue", on_malformed="exclude", bootstrap=100)
    assert out["win_rate"] == 1.0 and (out["win"], out["tie"], out["lose"]) == (1.0, 0.0, 0.0)
    assert out["win_rate_ci"] == [1.0, 1.0]
    assert (out["n_judged"], out["n_excluded"], out["n_malformed"]) == (2, 2, 3)
    assert out["scores"] == [1.0, None, 1.0, None] and out["verdicts"][1] == ["A", "?"]
    assert out["picks_a"] == 0.5  # the position check counts the judged prompts only
    fake_judge.script = ["garbage"] * 4
    none = judge.judge_win_rate(client(fake_judge), ["p0", "p1"], ["a0", "a1"], ["b0", "b1"], "dialogue",
                                on_malformed="exclude")
    assert none["win_rate"] is None and none["win_rate_ci"] is None and none["consistent"] is None
    assert (none["n_judged"], none["n_excluded"], none["n_malformed"]) == (0, 2, 4)


def test_client_url_auth_and_retries(fake_judge):
    fake_judge.script = [503, "Result: C"]
    c = judge.JudgeClient(fake_judge.url + "/v1/", "m", api_key="sk-test", timeout=5, max_retries=1, retry_wait=0.0)
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
    assert judge.parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply", ["A is better", "Result: Both", "Result: {A or B or C.}", ""])
def test_parse_verdict_rejects(reply):
    with pytest.raises(judge.JudgeReplyError):
        judge.parse_verdict(reply)


# --------------------------------------------------------------------------------------------
# The API key never leaks (issue #16)
# --------------------------------------------------------------------------------------------

KEY = "sk-secret-0123456789abcdef"


def _full_text(err: BaseException) -> str:
    """What a user could see of an exception: its message and its whole printed traceback."""
    import traceback

    return str(err) + "".join(traceback.format_exception(err))


def test_http_error_body_echoing_the_key_is_redacted(fake_judge):
    """A server that echoes the Authorization header in a 500 body (and reason phrase): the raised
    exception names the status and the body, with the key replaced by ***."""
    fake_judge.script = [(500, '{"error": "bad auth header: {authorization}"}', "Oops {authorization}")]
    c = client(fake_judge, api_key=KEY)
    with pytest.raises(RuntimeError, match="HTTP 500") as err:
        c.judge("p", "x", "y", "dialogue")
    assert fake_judge.headers[-1]["Authorization"] == f"Bearer {KEY}"  # the key was sent
    assert "bad auth header: Bearer ***" in str(err.value)
    assert KEY not in _full_text(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_long_error_body_is_capped_after_redaction(fake_judge):
    # the key straddles the 300-character cut: redacting after cutting would leave its prefix
    fake_judge.script = [(503, "x" * 290 + "{authorization}" + "y" * 100_000)]
    with pytest.raises(RuntimeError) as err:
        client(fake_judge, api_key=KEY).complete("hi")
    text = _full_text(err.value)
    assert KEY[:8] not in text and "y" * 400 not in text
    assert len(str(err.value)) < 500


@pytest.mark.parametrize("reply", [
    (200, "not json: {authorization}"),  # not a chat-completions response
    "I refuse. Your header was {authorization}",  # no verdict: JudgeReplyError quotes the reply
])
def test_malformed_reply_echoing_the_key_is_redacted(fake_judge, reply):
    fake_judge.script = [reply]
    with pytest.raises(judge.JudgeReplyError) as err:
        client(fake_judge, api_key=KEY).judge("p", "x", "y", "dialogue")
    assert "***" in str(err.value)
    assert KEY not in _full_text(err.value)


def test_verdict_is_still_read_when_the_reply_echoes_the_key(fake_judge):
    fake_judge.script = ["You sent {authorization}.\nResult: B"]
    assert client(fake_judge, api_key=KEY).judge("p", "x", "y", "dialogue") == "B"


@pytest.mark.parametrize("url, key, warns", [
    ("http://10.0.0.5:8000", KEY, True),  # the key would cross the network in clear
    ("http://judge.example.org/v1", KEY, True),
    ("http://judge.example.org/v1", None, False),  # no key to leak
    ("https://judge.example.org/v1", KEY, False),
    ("http://127.0.0.1:8000", KEY, False),  # loopback
    ("http://localhost:8000", KEY, False),
    ("http://[::1]:8000", KEY, False),
])
def test_plain_http_to_a_remote_host_warns(url, key, warns):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        judge.JudgeClient(url, "m", api_key=key)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert bool(messages) == warns
    if warns:
        assert "in clear" in messages[0] and KEY not in messages[0]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "judge.example.org", "ftp://host/x"])
def test_base_url_must_be_http_or_https(url):
    with pytest.raises(ValueError, match="http:// or https://"):
        judge.JudgeClient(url, "m")


def test_extra_body_is_sent_and_loopback_skips_the_proxy(fake_judge, monkeypatch):
    """A server's own options ride along (the local judge sends vLLM's structured_outputs); a
    loopback endpoint is reached directly even when $http_proxy names a proxy (none listens here)."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    fake_judge.script = ["Reason: x.\nResult: B"]
    c = client(fake_judge, extra_body={"structured_outputs": {"regex": judge.A3_REPLY_REGEX}})
    assert c.judge("p", "x", "y", "dialogue") == "B"
    body = fake_judge.requests[0]["body"]
    assert body["structured_outputs"] == {"regex": judge.A3_REPLY_REGEX} and body["model"] == "fake-gpt-4"


@pytest.mark.parametrize("reply, ok", [("Reason: both fine.\nResult: C", True), ("Reason: {one-sentence.}\nResult: A", True),
                                       ("Result: A", False), ("Reason: x\nResult: D", False)])
def test_a3_reply_regex_admits_only_the_a3_answer_format(reply, ok):
    import re

    assert bool(re.fullmatch(judge.A3_REPLY_REGEX, reply)) == ok
    if ok:
        assert judge.parse_verdict(reply) == reply[-1]  # whatever the constraint admits parses
