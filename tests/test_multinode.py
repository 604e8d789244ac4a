"""Multi-node through accelerate: the launcher's per-node command line, and a real run of 2
"machines" x 1 CPU process (two launchers started concurrently on this host, rendezvous on
loopback, gloo) that trains exactly like 1 machine x 2 processes."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file
from test_trainers import ENTRY_OVERRIDES, SMOKE, candidate_table, make_groups, max_diff

from vcb_lib.config import PROJECT_ROOT
from vcb_lib.launch import free_port, launch_command, launch_subprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ACCELERATE = PROJECT_ROOT / "params" / "accelerate"
NODE_TIMEOUT = 300  # s: a rendezvous that never completes fails the test instead of hanging CI

# The training entry point, after recording where this rank runs (torch's launcher sets GROUP_RANK
# to the node's rank): both runs go through it, so they differ only in their topology.
WHERE = """
import json, os, runpy, sys
from pathlib import Path
keys = ("RANK", "GROUP_RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps({k: int(os.environ[k]) for k in keys}))
sys.argv = ["vcb_lib.trainers", *sys.argv[2:]]
runpy.run_module("vcb_lib.trainers", run_name="__main__", alter_sys=True)
"""


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_command_line_for_one_node_of_several(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    node = launch_command(["-m", "pkg"], 16, cpu=True, port=29555, num_machines=2, machine_rank=1,
                          main_process_ip="10.0.0.1")
    assert [flag(node, f) for f in ("--num_machines", "--num_processes", "--machine_rank", "--main_process_ip",
                                    "--main_process_port", "--num_cpu_threads_per_process")] == \
        ["2", "16", "1", "10.0.0.1", "29555", "1"]  # 8 ranks on this node's 8 cores
    assert "--multi_gpu" in node and node[-4:] == ["--module", "vcb_lib.launch", "-m", "pkg"]
    # no port: never a random one (each node would pick its own); accelerate's 29500 or the config's
    assert "--main_process_port" not in launch_command(["t.py"], 2, num_machines=2, machine_rank=0,
                                                       main_process_ip="127.0.0.1")
    fsdp = launch_command(["t.py"], 16, config_file=ACCELERATE / "fsdp.yaml", num_machines=2, machine_rank=0,
                          main_process_ip="node0", port=29500)
    assert flag(fsdp, "--num_machines") == "2" and flag(fsdp, "--machine_rank") == "0" and "--multi_gpu" not in fsdp
    assert "--machine_rank" not in launch_command(["t.py"], 2, cpu=True)  # one machine: as before
    for bad in ({"machine_rank": 2, "main_process_ip": "h"}, {"machine_rank": 0}, {"main_process_ip": "h"}):
        with pytest.raises(ValueError):
            launch_command(["t.py"], 2, num_machines=2, **bad)
    with pytest.raises(ValueError, match="multiple of num_machines"):
        launch_command(["t.py"], 3, num_machines=2, machine_rank=0, main_process_ip="h")


def test_two_machines_train_like_two_processes_on_one(tok, base, tmp_path, monkeypatch):
    """VCB on 10 prompts, batch 2 per rank, 3 steps: launched as 2 machines x 1 process (each
    machine's launcher in its own process, as on two nodes; one output folder, as on a shared
    filesystem) it logs the same losses and gradient norms and saves the same weights as 1 machine
    x 2 processes, and its ranks really sat on two machines."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one core per rank in both runs: same kernels, same sums
    table = tmp_path / "candidates.parquet"
    candidate_table(make_groups(tok, base, 10)).to_parquet(table)
    where = tmp_path / "where.py"
    where.write_text(WHERE)

    def target(name: str) -> list[str]:
        (tmp_path / f"{name}-ranks").mkdir()
        return [str(where), str(tmp_path / f"{name}-ranks"), "--params", str(SMOKE), "--method", "vcb",
                "--candidates", str(table), "--out", str(tmp_path / name),
                *sum((["--set", o] for o in [*ENTRY_OVERRIDES, "training.batch_size=2"]), [])]

    launch_subprocess(target("one"), 2, cpu=True, echo=lambda line: None)  # the reference: 1 machine x 2

    args, port = target("two"), free_port()
    nodes = []
    for rank in (0, 1):
        caller = textwrap.dedent(f"""
            from vcb_lib.launch import launch_subprocess
            launch_subprocess({args!r}, 2, cpu=True, port={port}, num_machines=2, machine_rank={rank},
                              main_process_ip="127.0.0.1")
        """)
        nodes.append(subprocess.Popen([sys.executable, "-c", caller], cwd=PROJECT_ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=NODE_TIMEOUT)[0])
    finally:
        for node in nodes:  # a node left waiting: its launcher and rank die with it (die_with_parent)
            node.kill()
            node.wait()
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"machine {rank} failed:\n{out[-4000:]}"

    def placed(name: str) -> list[dict]:
        return [json.loads((tmp_path / f"{name}-ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert placed("one") == [{"RANK": r, "GROUP_RANK": 0, "LOCAL_RANK": r, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2}
                             for r in (0, 1)]
    assert placed("two") == [{"RANK": r, "GROUP_RANK": r, "LOCAL_RANK": 0, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 1}
                             for r in (0, 1)]

    def log(name: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    one, two = log("one"), log("two")
    assert [r["prompts"] for r in two] == [r["prompts"] for r in one] == [4, 4, 2]
    for a, b in zip(two, one):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])  # same ranks, same sums
    weights = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert max_diff(weights, load_file(tmp_path / "one" / "final" / "model.safetensors")) == 0
    assert max_diff(weights, base.state_dict()) > 100 * 1e-6  # it trained
