"""The launchers: output streams line by line, a failing rank's own exception is what the caller
sees, two CPU processes really run, and the accelerate configs load."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vcb_lib.config import PROJECT_ROOT
from vcb_lib.launch import (
    ERRORS_ENV,
    OWNER_ENV,
    LaunchError,
    _first_traceback,
    _worker,
    launch_command,
    launch_in_notebook,
    launch_subprocess,
)

ACCELERATE = PROJECT_ROOT / "params" / "accelerate"
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")


def script(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_output_streams_line_by_line(tmp_path):
    """Each line reaches the caller when printed, not when the run ends (single.yaml, one process)."""
    path = script(tmp_path, "slow.py", """
        import sys, time
        print("first line", sys.argv[1:])
        time.sleep(2.0)
        print("second line")
    """)
    arrivals = []
    rc = launch_subprocess([str(path), "--flag", "x"], 1, config_file=ACCELERATE / "single.yaml", cpu=True,
                           echo=lambda line: arrivals.append((time.monotonic(), line)))
    assert rc == 0
    times = {line: t for t, line in arrivals}
    assert "first line ['--flag', 'x']" in times and "second line" in times
    assert times["second line"] - times["first line ['--flag', 'x']"] > 1.5  # streamed, not buffered


def test_launched_processes_keep_freed_memory_in_the_heap(tmp_path, monkeypatch):
    """glibc reads MALLOC_* when a process starts: the launcher passes MALLOC_ENV to every rank, and a
    value the caller's environment or ``env`` sets wins (its speed-up is measured in bench/)."""
    from vcb_lib.launch import MALLOC_ENV

    path = script(tmp_path, "env.py", """
        import os
        print("MALLOC", os.environ.get("MALLOC_MMAP_MAX_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    """)
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    seen = []
    for env in (None, {"MALLOC_MMAP_MAX_": "65536"}):
        launch_subprocess([str(path)], 1, config_file=ACCELERATE / "single.yaml", cpu=True, echo=seen.append, env=env)
    assert [ln for ln in seen if ln.startswith("MALLOC")] == [f"MALLOC {MALLOC_ENV['MALLOC_MMAP_MAX_']} 4096",
                                                             "MALLOC 65536 4096"]


def test_failing_rank_surfaces_its_own_exception(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the error carries rank 1's traceback,
    not rank 0's broken-connection error. ddp.yaml on CPU really runs two processes."""
    path = script(tmp_path, "fail.py", """
        import time, torch
        from accelerate import Accelerator
        acc = Accelerator()
        print(f"hello from rank {acc.process_index} of {acc.num_processes} ({acc.distributed_type})", flush=True)
        if acc.process_index == 1:
            time.sleep(0.5)
            raise ValueError("boom on rank 1")
        torch.distributed.all_reduce(torch.ones(1))  # rank 0 blocks here until rank 1 is gone
    """)
    lines = []
    with pytest.raises(LaunchError) as err:
        launch_subprocess([str(path)], 2, config_file=ACCELERATE / "ddp.yaml", cpu=True, echo=lines.append)
    assert err.value.rank == 1 and err.value.returncode != 0
    assert "ValueError: boom on rank 1" in str(err.value) and "fail.py" in err.value.root_cause
    assert err.value.root_cause.rstrip().endswith("ValueError: boom on rank 1")
    out = "\n".join(lines)
    assert "hello from rank 0 of 2 (DistributedType.MULTI_CPU)" in out and "hello from rank 1 of 2 (DistributedType.MULTI_CPU)" in out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@LINUX
@pytest.mark.parametrize("config, n", [("single", 1), ("ddp", 2)])
def test_launched_processes_die_with_the_caller(tmp_path, config, n):
    """The caller of launch_subprocess killed by SIGKILL (a notebook kernel whose runner died): the
    accelerate launcher and every rank end at once, although they write nothing to the closed pipe
    (the ranks sleep) and torch's launcher starts each rank in a session of its own."""
    path = script(tmp_path, "sleep.py", """
        import os, time
        os.write(1, f"rank pids {os.getpid()} {os.getppid()}\\n".encode())  # one write: two ranks never split a line
        time.sleep(120)
    """)
    config_file = str(ACCELERATE / f"{config}.yaml")
    caller = (f"from vcb_lib.launch import launch_subprocess\n"
              f"launch_subprocess([{str(path)!r}], {n}, config_file={config_file!r}, cpu=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", caller], stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
                            start_new_session=True)
    pids: set[int] = set()
    try:
        for line in proc.stdout:
            for found in re.findall(r"rank pids (\d+) (\d+)", line):  # and two lines may still meet in the pipe
                pids.update(map(int, found))
            if len(pids) == n + 1:  # every rank and their launcher
                break
        assert len(pids) == n + 1, f"expected {n} rank(s) and a launcher, got pids {pids} (rc {proc.poll()})"
        proc.kill()  # the caller only, not its process group
        proc.wait()
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "launcher or rank alive 5 s after the caller was killed"
    finally:
        proc.kill()
        proc.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@LINUX
def test_rank_whose_launcher_is_already_gone_ends_at_once(tmp_path):
    """A rank asks for its death signal when it starts: if its launcher died before (the caller named
    by OWNER_ENV is no longer among its ancestors), it ends at once instead of running unowned."""
    path = script(tmp_path, "ran.py", "open(__file__ + '.ran', 'w').close()\n")
    ran = Path(f"{path}.ran")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # alive, not an ancestor
    try:
        lost = subprocess.run([sys.executable, "-m", "vcb_lib.launch", str(path)], cwd=PROJECT_ROOT,
                              env={**os.environ, OWNER_ENV: str(stranger.pid)})
        assert lost.returncode == -signal.SIGKILL and not ran.exists()
        owned = subprocess.run([sys.executable, "-m", "vcb_lib.launch", str(path)], cwd=PROJECT_ROOT,
                               env={**os.environ, OWNER_ENV: str(os.getpid())})
        assert owned.returncode == 0 and ran.exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_command_line_for_cpu_processes():
    two = launch_command(["-m", "pkg.mod", "--a"], 2, cpu=True, port=1234)
    assert "--multi_gpu" in two and "--cpu" not in two  # --cpu with 2 processes would run ONE
    assert two[two.index("--num_processes") + 1] == "2" and two[two.index("--main_process_port") + 1] == "1234"
    assert two[-5:] == ["--module", "vcb_lib.launch", "-m", "pkg.mod", "--a"]
    one = launch_command(["train.py"], 1, cpu=True)
    assert "--cpu" in one and "--multi_gpu" not in one
    ddp = launch_command(["train.py"], 2, config_file=ACCELERATE / "ddp.yaml")
    assert ddp[ddp.index("--config_file") + 1] == str(ACCELERATE / "ddp.yaml") and "--multi_gpu" not in ddp
    single = launch_command(["train.py"], 2, config_file=ACCELERATE / "single.yaml")
    assert "--multi_gpu" in single  # single.yaml says NO: 2 processes need --multi_gpu
    assert "--multi_gpu" not in launch_command(["train.py"], 1, config_file=ACCELERATE / "single.yaml")


def test_each_rank_gets_its_share_of_the_cores(monkeypatch):
    """accelerate would export OMP_NUM_THREADS=1 (half the speed on 2 cores); a user's setting wins."""
    def threads(cmd):
        return cmd[cmd.index("--num_cpu_threads_per_process") + 1]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert threads(launch_command(["t.py"], 1, cpu=True)) == "8" and threads(launch_command(["t.py"], 2, cpu=True)) == "4"
    assert threads(launch_command(["t.py"], 16, cpu=True)) == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads(launch_command(["t.py"], 2, cpu=True)) == "3"


def test_worker_records_exceptions_and_exit_codes(tmp_path, monkeypatch):
    monkeypatch.setenv(ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    path = script(tmp_path, "exit.py", "import sys\nsys.exit(7)\n")
    with pytest.raises(SystemExit):
        _worker([str(path)])
    assert "SystemExit: 7" in (tmp_path / "rank-3.json").read_text()
    path = script(tmp_path, "raise.py", "raise KeyError('missing thing')\n")
    with pytest.raises(KeyError):
        _worker([str(path)])
    assert "KeyError: 'missing thing'" in (tmp_path / "rank-3.json").read_text()
    _worker([str(script(tmp_path, "ok.py", "x = 1\n"))])  # success writes nothing new


def test_first_traceback_fallback():
    """Without worker reports, the first traceback of the output; rank-prefixed lines of another
    rank interleaved into it are left out."""
    plain = ["Traceback (most recent call last):", '  File "a.py", line 3, in <module>', "    f()",
             "ZeroDivisionError: division by zero", "later output"]
    assert _first_traceback(plain) == "\n".join(plain[:4])
    assert _first_traceback(["starting", "done"]) is None
    mixed = ["starting", "[rank1]: Traceback (most recent call last):", "[rank0]: still working",
             '[rank1]:   File "a.py", line 1, in <module>', "[rank1]: RuntimeError: x",
             "Traceback (most recent call last):", '  File "b.py"', "OSError: closed"]
    assert _first_traceback(mixed) == "\n".join(mixed[i] for i in (1, 3, 4))


def test_launch_in_notebook_one_process():
    assert launch_in_notebook(lambda a, b: a + b, (2, 3), num_processes=1) == 5


def test_launch_in_notebook_two_cpu_processes(tmp_path):
    """notebook_launcher forks 2 gloo ranks; run in a fresh interpreter (as a fresh kernel), since
    this test session has created Accelerators already."""
    code = textwrap.dedent(f"""
        import torch
        from vcb_lib.launch import launch_in_notebook

        def fn(out):
            from accelerate import Accelerator
            acc = Accelerator()
            total = acc.reduce(torch.tensor([acc.process_index + 1.0]), "sum").item()
            open(f"{{out}}/rank{{acc.process_index}}.txt", "w").write(f"{{acc.num_processes}} {{total}}")

        launch_in_notebook(fn, ({str(tmp_path)!r},), num_processes=2, cpu=True)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, cwd=PROJECT_ROOT)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["2 3.0", "2 3.0"]


@pytest.mark.parametrize("name", ["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    if name == "single":
        assert (cfg.distributed_type.value, cfg.num_processes) == ("NO", 1)
        return
    assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16" and cfg.num_machines == 1
    expect = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert cfg.distributed_type.value == expect
    if expect == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config  # "auto": the trainer's grad_accum
    if expect == "FSDP":
        assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
