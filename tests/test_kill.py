"""A killed run leaves nothing running (issue #16 case 5): ``kill -9`` of ``python -m vcb_lib run``'s
process group ends its Jupyter kernel, the ``accelerate launch`` process and the trainer at once,
although the kernel runs in a session of its own and the trainer is two processes further down."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vcb_lib.config import PROJECT_ROOT

pytestmark = [pytest.mark.notebook,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")]

SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"


def processes() -> dict[int, tuple[int, str, str, str]]:
    """Every live process: pid -> (ppid, start time, state, command line). Zombies count as gone."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ... starttime is field 22 of stat
        if fields[0] not in ("Z", "X"):
            found[int(entry.name)] = (int(fields[1]), fields[19], fields[0], cmdline)
    return found


def descendants(root: int, procs: dict) -> dict[int, tuple]:
    """``root`` and every process below it."""
    tree, grew = {root: procs[root]} if root in procs else {}, True
    while grew:
        below = {pid: p for pid, p in procs.items() if p[0] in tree and pid not in tree}
        tree.update(below)
        grew = bool(below)
    return tree


def survivors(tree: dict[int, tuple], marker: str) -> dict[int, str]:
    """Processes of ``tree`` still alive (same pid and start time), and any whose command line names ``marker``."""
    now = processes()
    alive = {pid: now[pid][3] for pid, p in tree.items() if pid in now and now[pid][1] == p[1]}
    return alive | {pid: p[3] for pid, p in now.items() if marker in p[3] and pid != os.getpid()}


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_killed_runner_takes_every_process_of_the_run_with_it(tmp_path):
    out = tmp_path / "outputs"
    base = [sys.executable, "-m", "vcb_lib", "run", str(SMOKE), "--set", f"run.output_root={out}",
            "--set", "run.name=k", "--set", "training.batch_size=8"]  # D_t records it: stages 01-02 and 03 agree
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    upstream = subprocess.run([*base, "--only", "01", "02"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
    assert upstream.returncode == 0, upstream.stdout[-3000:] + upstream.stderr[-3000:]

    # smoke has 8 prompts: 8 per step for 200 steps is minutes of training, in steps of a second or more
    console = tmp_path / "console.txt"
    with open(console, "w") as sink:
        proc = subprocess.Popen([*base, "--set", "training.epochs=200", "--set", "training.max_steps=200",
                                 "--only", "03"], cwd=PROJECT_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    tree: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + 600
        while not any(lines(p) for p in out.glob("k/03_train/*/log.jsonl")):  # training under way
            assert proc.poll() is None, f"run ended (rc {proc.returncode}):\n{console.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training step logged in 10 min"
            time.sleep(0.2)
        log = next(p for p in out.glob("k/03_train/*/log.jsonl") if lines(p))
        tree = descendants(proc.pid, processes())
        kinds = [c for c in ("ipykernel", "accelerate.commands.launch", " -m vcb_lib.launch -m vcb_lib.trainers")
                 if not any(c in p[3] for p in tree.values())]
        assert not kinds, f"processes missing from the run: {kinds}; found {[p[3] for p in tree.values()]}"
        logged = lines(log)
        while lines(log) == logged:  # kill just after a step is logged: the next one is a whole step away
            assert proc.poll() is None and time.monotonic() < deadline, "training ended or stalled"
            time.sleep(0.02)

        os.killpg(proc.pid, signal.SIGKILL)  # the runner's group: the kernel is in a session of its own
        killed, logged = time.monotonic(), lines(log)
        proc.wait()
        while survivors(tree, str(out)) and time.monotonic() < killed + 10:
            time.sleep(0.1)
        assert not survivors(tree, str(out)), f"alive 10 s after the kill: {survivors(tree, str(out))}"
        gone = time.monotonic() - killed
        time.sleep(2)
        assert lines(log) == logged, f"{lines(log) - logged} step(s) logged after the kill (gone after {gone:.1f} s)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in survivors(tree, str(out)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
