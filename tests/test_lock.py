"""One writer per run folder (issue #16, case 1): a second run of the same folder fails at once
naming the holder; a holder killed with -9 leaves nothing that blocks the next run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vcb_lib.config import PROJECT_ROOT
from vcb_lib.io import LOCK_FILE, FolderBusy, folder_lock

HOLD = "import sys, time; from vcb_lib.io import folder_lock\nwith folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def wait_for_holder(folder, pid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / LOCK_FILE).read_text() or "{}").get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"PID {pid} never took {folder}")


def test_second_writer_fails_then_takes_over_after_kill_9(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"being written by PID {holder.pid} "):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(tmp_path / "run") as folder:  # the killed holder's lock died with it
        with folder_lock(folder):  # re-entrant in one process
            pass
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_two_real_runs_of_one_folder(tmp_path):
    """Two runners on the same run.name: the second exits 2 at once naming the first's PID and
    command; the first finishes normally."""
    cmd = [sys.executable, "-m", "vcb_lib", "run", str(PROJECT_ROOT / "params" / "smoke.yaml"), "--only", "00",
           "--set", f"run.output_root={tmp_path}", "--set", "run.name=same"]
    first = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_holder(tmp_path / "same", first.pid)
        t0 = time.monotonic()
        second = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is being written by PID {first.pid} (" in second.stderr and "vcb_lib" in second.stderr
        assert time.monotonic() - t0 < 60  # fails at once, does not wait for the first
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert json.loads((tmp_path / "same" / "00_theory" / "checks.json").read_text())["passed"]
