"""A judge server in the loop (issue #23): vLLM's own OpenAI-compatible server, started by
``evaluation.judge: local``, judges pairs through vcb_lib.judge's client; a fake server process
(tests/fixtures/fake_judge_server.py) drives the failure paths: it exits at start, never gets
healthy, dies mid-run, ignores SIGTERM, has a child, or outlives a killed parent."""
import contextlib
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from vcb_lib import judge
from vcb_lib.config import load_params
from vcb_lib.launch import free_port
from vcb_lib.stages import evaluate as ev

FAKE = Path(__file__).parent / "fixtures" / "fake_judge_server.py"
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)


def fake(tmp_path, *flags: str, **kw):
    """:func:`judge.serve` over the fake server on a free port; ``kw`` goes to serve."""
    port = free_port()
    return judge.serve([sys.executable, str(FAKE), str(port), *flags], f"http://127.0.0.1:{port}",
                       tmp_path / "server.log", model="fake-judge", **kw)


def pids_in_log(log: Path, prefix: str) -> list[int]:
    """The pids the fake server printed after ``prefix`` ("fake judge server pid", "child pid")."""
    return [int(p) for p in re.findall(rf"^{prefix} (\d+)", log.read_text(), re.MULTILINE)]


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies aside) of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def sample_table(n: int) -> pd.DataFrame:
    """k = 0 samples of vcb and sft on n prompts: vcb's responses are the longer ones."""
    return pd.DataFrame([{"method": m, "prompt_id": f"p{i}", "prompt": f"Review film {i}.", "k": 0,
                          "response": f"A long and warm review of film number {i}." if m == "vcb" else f"Film {i}."}
                         for m in ("vcb", "sft") for i in range(n)])


# --------------------------------------------------------------------------------------------
# The real server (vLLM installed, as in CI and `make test`)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make vllm): the real judge server needs it")
def test_local_vllm_server_judges_pairs_in_both_orders(tmp_path, monkeypatch):
    """`evaluation.judge: local` through the stage: vLLM serves the packaged SmolLM2 on loopback,
    every pair is asked in both orders through the client, every reply parses into a verdict, and
    the server (with its engine processes) is gone afterwards."""
    sent, started = [], time.perf_counter()
    complete = judge.JudgeClient.complete

    def record(self, content):
        sent.append(content)
        return complete(self, content)

    monkeypatch.setattr(judge.JudgeClient, "complete", record)
    servers = []
    local_server = judge.local_server

    @contextlib.contextmanager
    def keep(*args, **kwargs):
        with local_server(*args, **kwargs) as server:
            servers.append(server)
            yield server

    monkeypatch.setattr(judge, "local_server", keep)
    cfg = load_params(None, {"run.output_root": str(tmp_path), "training.methods": ["vcb"], "evaluation.judge": "local",
                             "evaluation.bootstrap": 20})
    about = {}
    out = ev.judge_win_rates(cfg, sample_table(3), about=about, log=print)
    wall = time.perf_counter() - started

    result = out["sft"]
    assert result["n"] == 3 and result["n_malformed"] == 0  # every reply parsed ("Result: A|B|C")
    assert all(v in ("A", "B", "C") for pair in result["verdicts"] for v in pair)
    for i in range(3):  # both orders of every pair were asked
        mine, theirs = f"A long and warm review of film number {i}.", f"Film {i}."
        assert sum(f"Response A: {mine}\nResponse B: {theirs}\n" in s for s in sent) == 1
        assert sum(f"Response A: {theirs}\nResponse B: {mine}\n" in s for s in sent) == 1
    assert len(sent) == 6
    assert set(result) >= {"consistent", "same_position", "picks_a"}
    assert about["endpoint"] == "local" and about["model"] == judge.LOCAL_JUDGE_MODEL and about["requests"] == 6
    log = Path(about["log"])
    text = log.read_text()  # the server's output went to the run folder; it was stopped by SIGTERM, gracefully
    assert log.parent == cfg.run_dir / "04_eval" / "judge" and "non-default args" in text and "[shutdown] API server" in text
    assert len((log.parent / "vcb-vs-sft.jsonl").read_text().splitlines()) == 3
    (server,) = servers
    assert server.process.returncode is not None and not group_members(server.process.pid)  # engine processes too
    print(f"\nreal judge server: up in {about['start_seconds']:.1f} s, {about['requests']} requests in "
          f"{about['seconds']:.1f} s, test wall time {wall:.1f} s; verdicts {result['verdicts']}")
    from vcb_lib.report import judge_notes

    assert any("A weak judge" in line for line in judge_notes(about))


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (make vllm): the real judge server needs it")
def test_local_vllm_server_writes_cut_judgments(tmp_path):
    """`training.cut_judge: local`: vLLM serves the packaged SmolLM2 while D_t is judged for CUT; every
    reply is held to the critique-then-verdict format, so each candidate gets a judgment of a known
    sign, and the server is gone afterwards."""
    from vcb_lib.stages.train import judged_candidates

    cfg = load_params(None, {"run.output_root": str(tmp_path), "training.methods": ["cut"], "training.cut_judge": "local",
                             "models.policy": "tiny-random", "models.sft": False})
    table = pd.DataFrame({"prompt": ["Write a short review of a film.", "Write a short review of a play."],
                          "response": ["Dull, boring and far too long.", "A lovely, warm evening."],
                          "model_input": ["<a>", "<b>"]})
    started = time.perf_counter()
    judged = pd.read_parquet(judged_candidates(cfg, table, tmp_path / "judged.parquet", log=print))
    assert list(judged.judgment_source) == [f"llm-{judge.LOCAL_JUDGE_MODEL}"] * 2
    for row in judged.itertuples():
        values = json.loads(row.judgment_values)
        assert values["verdict"] in ("good", "bad") and row.judgment_positive == (values["verdict"] == "good")
        assert row.judgment and (row.judgment_positive or row.judgment == values["critique"])
    log = (tmp_path / "judge-server.log").read_text()
    assert "[shutdown] API server" in log
    print(f"\nlocal CUT judgments in {time.perf_counter() - started:.1f} s: {list(judged.judgment)}")


# --------------------------------------------------------------------------------------------
# Failure paths, with the fake server process
# --------------------------------------------------------------------------------------------


def test_server_that_exits_at_start_raises_with_its_log_tail(tmp_path):
    with pytest.raises(judge.JudgeServerError, match="exited with code 3") as err:
        with fake(tmp_path, "--exit-now", "3", "--child"):
            pytest.fail("the block must not run")
    assert "fatal: simulated start-up failure (no device found)" in str(err.value)
    assert str(tmp_path / "server.log") in str(err.value)
    (child,) = pids_in_log(tmp_path / "server.log", "child pid")
    assert gone(child)  # the exited server's child was not left behind


def test_server_that_never_gets_healthy_times_out_and_is_stopped(tmp_path):
    started = time.perf_counter()
    with pytest.raises(judge.JudgeServerError, match=r"did not answer http://127\.0\.0\.1:\d+/health within 2 s") as err:
        with fake(tmp_path, "--no-health", start_timeout=2, poll=0.1):
            pytest.fail("the block must not run")
    assert time.perf_counter() - started < 15
    assert "loading weights ..." in str(err.value)
    assert len(str(err.value).splitlines()) <= judge.LOG_TAIL_LINES + 2  # the tail, not the whole log
    (pid,) = pids_in_log(tmp_path / "server.log", "fake judge server pid")
    assert gone(pid)


def test_server_is_stopped_with_its_child_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError, match="boom"):
        with fake(tmp_path, "--child") as server:
            assert judge.JudgeClient(server.url, server.model, max_retries=0).judge("p", "x y", "z", "dialogue") == "A"
            assert server.exit_report() is None and server.start_seconds > 0
            raise KeyError("boom")
    assert server.process.returncode is not None
    (child,) = pids_in_log(tmp_path / "server.log", "child pid")
    assert gone(server.process.pid) and gone(child)


def test_server_that_ignores_sigterm_is_killed(tmp_path):
    started = time.perf_counter()
    with fake(tmp_path, "--ignore-sigterm", stop_grace=1) as server:
        pass
    assert server.process.returncode == -signal.SIGKILL
    assert time.perf_counter() - started < 15


def test_server_dies_with_its_parent(tmp_path):
    """The process that started the server is killed (SIGKILL): the server gets SIGTERM and ends."""
    port = free_port()
    code = (f"import sys, time\nfrom vcb_lib import judge\n"
            f"with judge.serve([sys.executable, {str(FAKE)!r}, '{port}'], 'http://127.0.0.1:{port}', "
            f"{str(tmp_path / 'server.log')!r}) as s:\n    print(s.process.pid, flush=True)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert running(pid)
        parent.kill()
        parent.wait()
        assert gone(pid), "the judge server outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_local_without_vllm_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    cfg = load_params(None, {"evaluation.judge": "local", "run.output_root": str(tmp_path)})
    with pytest.raises(RuntimeError, match=r"not installed: run `make vllm`"):
        ev.check_judge(cfg)
    with pytest.raises(RuntimeError, match=r"not installed: run `make vllm`"):
        with judge.local_server("some/folder", tmp_path / "server.log"):
            pytest.fail("no server without vLLM")
    assert not (tmp_path / "server.log").exists()


def test_a_judge_that_dies_mid_run_names_the_pairs_done_and_a_rerun_resumes(tmp_path):
    cfg = load_params(None, {"run.output_root": str(tmp_path), "training.methods": ["vcb"], "evaluation.bootstrap": 20,
                             "evaluation.judge_workers": 1})
    samples = sample_table(4)
    with fake(tmp_path / "first", "--die-after", "4") as server:  # answers 2 pairs (4 requests), then crashes
        client = judge.JudgeClient(server.url, "fake-judge", max_retries=0)
        with pytest.raises(RuntimeError, match=r"vcb vs sft stopped after 2 of 4 pairs \(prompts p0, p1\); they are saved "
                                               r"in .*vcb-vs-sft\.jsonl and a rerun resumes from them") as err:
            ev.judge_win_rates(cfg, samples, client=client, log=lambda m: None)
    assert "unreachable" in str(err.value) or "Connection" in str(err.value)
    assert "exited with code 1" in server.exit_report() and "fatal: simulated crash mid-run" in server.exit_report()
    assert isinstance(err.value.__cause__, judge.JudgeRunError) and sorted(err.value.__cause__.done) == [0, 1]
    with fake(tmp_path / "second") as server:
        about = {}
        out = ev.judge_win_rates(cfg, samples, client=judge.JudgeClient(server.url, "fake-judge", max_retries=0),
                                 about=about, log=lambda m: None)
    asked = [line for line in (tmp_path / "second" / "server.log").read_text().splitlines() if line.startswith("request")]
    assert len(asked) == 4 and all("film number 2" in q or "film number 3" in q for q in asked)  # only p2, p3
    assert about["requests"] == 4
    result = out["sft"]
    assert result["verdicts"] == [["A", "B"]] * 4 and result["win"] == 1.0  # the longer response, in both orders
    assert (result["consistent"], result["same_position"], result["picks_a"]) == (1.0, 0.0, 0.5)


def test_concurrent_requests_keep_the_prompts_order_and_resume(tmp_path):
    """judge_workers > 1: the verdicts come back in the prompts' order; every pair is saved once."""
    cfg = load_params(None, {"run.output_root": str(tmp_path), "training.methods": ["vcb"], "evaluation.bootstrap": 20,
                             "evaluation.judge_workers": 4})
    samples = sample_table(6)
    samples.loc[(samples.method == "vcb") & (samples.prompt_id.isin(["p1", "p4"])), "response"] = "No."
    with fake(tmp_path) as server:
        out = ev.judge_win_rates(cfg, samples, client=judge.JudgeClient(server.url, "m", max_retries=0), log=lambda m: None)
        again = ev.judge_win_rates(cfg, samples, client=judge.JudgeClient(server.url, "m", max_retries=0), log=lambda m: None)
    assert out["sft"]["scores"] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert again["sft"]["verdicts"] == out["sft"]["verdicts"]
    assert len([line for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("request")]) == 12
    saved = (cfg.run_dir / "04_eval" / "judge" / "vcb-vs-sft.jsonl").read_text().splitlines()
    assert len(saved) == 6


def test_position_bias():
    assert judge.position_bias([["A", "B"], ["B", "A"], ["C", "C"], ["A", "A"]]) == \
        {"consistent": 0.75, "same_position": 0.25, "picks_a": 4 / 6}
    assert judge.position_bias([["A", "A"], ["A", "?"]]) == {"consistent": 0.0, "same_position": 0.5, "picks_a": 1.0}
    assert judge.position_bias([["C", "?"]])["picks_a"] is None
    with pytest.raises(ValueError):
        judge.position_bias([])


def test_resume_input_is_checked():
    with pytest.raises(ValueError, match=r"done\[3\]"):
        judge.judge_win_rate(judge.JudgeClient("http://127.0.0.1:9", "m"), ["p"], ["a"], ["b"], "dialogue",
                             done={3: ("A", "B")})


def test_report_names_the_judge_and_calls_the_packaged_smollm2_weak():
    from vcb_lib.report import judge_notes

    local = judge_notes({"endpoint": "local", "model": judge.LOCAL_JUDGE_MODEL, "start_seconds": 21.4, "requests": 240,
                         "seconds": 46.3})
    assert "served by vLLM's OpenAI-compatible server" in local[0] and "up in 21 s; 240 requests in 46 s" in local[0]
    assert "A weak judge" in local[1] and "evaluation.judge_model" in local[1]
    strong = judge_notes({"endpoint": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen2.5-72B-Instruct"})
    assert strong == ["Judge: `Qwen/Qwen2.5-72B-Instruct` at http://127.0.0.1:8000/v1.\n"]
    assert judge_notes({}) == []  # metrics written before the judge was recorded
