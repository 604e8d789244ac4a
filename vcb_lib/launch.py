"""Run a training function from a notebook cell, in this kernel or as an ``accelerate launch``
subprocess whose log streams into the cell.

- :func:`launch_in_notebook` wraps ``accelerate.notebook_launcher``: the ``Accelerator`` must be
  created INSIDE ``fn``, and nothing may touch CUDA in the kernel before (the workers are forked).
- :func:`launch_subprocess` runs ``accelerate launch`` with a script or ``-m module`` and its
  arguments, prints the combined output of every rank line by line as it comes, and on failure
  raises :class:`LaunchError` carrying the real root cause: the traceback of the rank that failed
  FIRST, not rank 0's later "connection closed". Each rank runs through this module's worker
  wrapper (``python -m vcb_lib.launch TARGET ...``), which writes a failing rank's traceback with a
  timestamp into a folder the launcher reads afterwards.
- :func:`train_subprocess` launches ``python -m vcb_lib.trainers`` with the params file's
  ``training.accelerate_config`` and ``training.num_processes``.

Several machines: call the launcher once on every node with the same ``num_processes`` (the total
over all nodes, as in accelerate), ``num_machines``, ``main_process_ip`` (node 0's address) and
``port``, and that node's ``machine_rank`` (0 on the node at ``main_process_ip``); they are handed to
``accelerate launch`` as ``--num_machines/--machine_rank/--main_process_ip/--main_process_port``
(a config file's own values are kept where a key is not given). Every node must see the params,
candidates and output paths (a shared filesystem): only global rank 0 writes, and every rank reads
the checkpoints it resumes from. Tested as 2 machines x 1 CPU process on loopback
(tests/test_multinode.py); README "Sampling with vLLM, training on GPUs" has the per-node command.

Several CPU processes: ``accelerate launch --cpu --num_processes 2`` silently runs ONE process, so
``cpu=True`` uses ``--multi_gpu --num_processes N`` with ``ACCELERATE_USE_CPU=1`` in the
environment: every ``Accelerator()`` then runs on CPU with the gloo backend.

Launched processes keep freed memory in glibc's heap (``MALLOC_ENV``, unless the environment sets
those variables itself); what that buys is measured in bench/README.md.

Launched processes die with their caller, even when it is killed by SIGKILL (Linux; elsewhere
nothing is done): the ``accelerate launch`` process is started with :func:`die_with_parent`, and
each rank, when it starts, asks for the same signal from the launcher that started it (``OWNER_ENV``
names the caller, so a rank whose launcher is already gone ends at once). Without this a killed
``python -m vcb_lib run`` left the launcher and the trainer running until the trainer next wrote
to its closed output pipe (one more training step).
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

ERRORS_ENV = "VCB_LAUNCH_ERRORS"  # folder where worker ranks write their tracebacks
# glibc serves every allocation over 32 MB with a fresh mmap and unmaps it on free, so a training step
# page-faults its large tensors in anew each time (a 49152 x 576 embedding gradient is 113 MB).
# Serving them from the heap and trimming it only past 1 GiB keeps those pages (timings: bench/README.md).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**30)}
TAIL_LINES = 400  # output lines kept for the error message when no rank wrote a traceback file
OWNER_ENV = "VCB_LAUNCH_OWNER"  # pid of the process that called launch_subprocess: its ranks die with it
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal this process gets when the thread that forked it ends


class LaunchError(RuntimeError):
    """A launched run failed. ``rank`` and ``root_cause`` (traceback text) of the first failure."""

    def __init__(self, message: str, *, returncode: int, rank: int | None, root_cause: str):
        super().__init__(message)
        self.returncode, self.rank, self.root_cause = returncode, rank, root_cause


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# In the kernel
# --------------------------------------------------------------------------------------------


def launch_in_notebook(fn: Callable, args: tuple = (), num_processes: int = 1, *, cpu: bool = False,
                       mixed_precision: str = "no", port: int | None = None):
    """``accelerate.notebook_launcher(fn, args, num_processes)``; returns ``fn``'s result with one
    process (None with several: each worker returns into its own process).

    ``fn`` must create its ``Accelerator`` (e.g. build a :class:`~vcb_lib.trainers.Trainer`) itself.
    ``cpu=True`` makes every Accelerator in the workers use the CPU (gloo) even where a GPU exists.
    """
    import torch
    from accelerate import notebook_launcher
    from accelerate.utils import patch_environment

    if num_processes > 1 and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in this kernel before launching; the forked workers cannot use it. "
                           "Restart the kernel and keep every device call inside the launched function.")
    result = []
    env = {"ACCELERATE_USE_CPU": "true"} if cpu else {}
    with patch_environment(**env):
        if num_processes == 1:
            notebook_launcher(lambda *a: result.append(fn(*a)), args, num_processes=1, mixed_precision=mixed_precision)
        else:
            notebook_launcher(fn, args, num_processes=num_processes, mixed_precision=mixed_precision,
                              use_port=str(port or free_port()))
    return result[0] if result else None


# --------------------------------------------------------------------------------------------
# As a subprocess
# --------------------------------------------------------------------------------------------


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``signum`` (SIGKILL) when this
    process dies, however it dies (Linux ``PR_SET_PDEATHSIG``); None on other platforms. SIGTERM
    suits a child that must stop children of its own (a vLLM server and its engine processes).

    The signal comes when the THREAD that started the child ends, so start it from a thread that
    outlives it (``launch_subprocess`` waits for its child in the thread that started it). If this
    process died before the request took effect, the child gets the signal at once.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no imports, no locks
        prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec


def launch_command(target: Sequence[str], num_processes: int = 1, config_file: str | os.PathLike | None = None,
                   cpu: bool = False, port: int | None = None, *, num_machines: int | None = None,
                   machine_rank: int | None = None, main_process_ip: str | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``target`` (script + args, or ``-m module``
    + args) in ``num_processes`` ranks, each through this module's worker wrapper.

    With ``num_machines`` > 1 (given, or the config file's) this is one node's command:
    ``num_processes`` counts the ranks of all nodes, ``machine_rank`` is this node's (0 hosts the
    rendezvous at ``main_process_ip:port``). Every node must name the same port: none is picked at
    random then (without ``port``, the config file's ``main_process_port`` or accelerate's 29500).
    """
    config = _read_config(config_file) if config_file is not None else {}
    machines = int(num_machines if num_machines is not None else config.get("num_machines") or 1)
    if machines > 1:
        rank = machine_rank if machine_rank is not None else config.get("machine_rank")
        ip = main_process_ip or config.get("main_process_ip")
        if num_processes % machines:
            raise ValueError(f"num_processes ({num_processes}) counts the ranks of all {machines} machines: "
                             "it must be a multiple of num_machines")
        if rank is None or not 0 <= int(rank) < machines:
            raise ValueError(f"machine_rank must be this node's rank in 0..{machines - 1}, got {rank}")
        if not ip:
            raise ValueError("several machines need main_process_ip: the address of the node with machine_rank 0")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
        if num_processes > 1 and str(config.get("distributed_type", "NO")) == "NO":
            cmd += ["--multi_gpu"]  # a one-process config asked for several: it would silently run one
        if num_machines is not None:
            cmd += ["--num_machines", str(num_machines)]
    else:
        cmd += ["--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            cmd += ["--multi_gpu"]  # also on CPU: `--cpu` with several processes runs only one
        elif cpu:
            cmd += ["--cpu"]
    cmd += ["--num_processes", str(num_processes)]
    if machines > 1:
        cmd += ["--machine_rank", str(rank), "--main_process_ip", str(ip)]
    # accelerate exports OMP_NUM_THREADS=1 unless told otherwise: on a 2-core CPU that halves the
    # training speed (bench/README.md). Give each rank its share of this node's cores.
    per_node = max(1, num_processes // machines)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // per_node))
    cmd += ["--num_cpu_threads_per_process", threads]
    if port is not None or (num_processes > 1 and machines == 1):
        cmd += ["--main_process_port", str(port or free_port())]
    return cmd + ["--module", "vcb_lib.launch", *target]


def _read_config(config_file: str | os.PathLike) -> dict:
    import yaml

    path = Path(config_file)
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def launch_subprocess(script_or_module_args: Sequence[str] | str, num_processes: int = 1,
                      config_file: str | os.PathLike | None = None, cpu: bool = False, *,
                      env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                      echo: Callable[[str], None] | None = None, port: int | None = None,
                      num_machines: int | None = None, machine_rank: int | None = None,
                      main_process_ip: str | None = None) -> int:
    """Run ``accelerate launch`` on ``script_or_module_args`` (``["train.py", "--x", "1"]`` or
    ``["-m", "vcb_lib.trainers", ...]``), streaming every output line to ``echo`` (default: print
    and flush) as it arrives. Returns 0; raises :class:`LaunchError` with the first failing rank's
    traceback otherwise. The launcher and its ranks are killed if this process dies (Linux).
    ``port``, ``num_machines``, ``machine_rank``, ``main_process_ip``: see :func:`launch_command`
    (on several machines, call this on every node; ``num_processes`` counts all their ranks).
    """
    target = script_or_module_args.split() if isinstance(script_or_module_args, str) else list(script_or_module_args)
    if not target:
        raise ValueError("nothing to launch: pass a script path or -m module, with its arguments")
    echo = echo or (lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory(prefix="vcb-launch-") as errors:
        run_env = {**MALLOC_ENV, **os.environ, **(env or {}), ERRORS_ENV: errors, "PYTHONUNBUFFERED": "1",
                   OWNER_ENV: str(os.getpid())}
        if cpu:
            run_env["ACCELERATE_USE_CPU"] = "true"
        root = str(Path(__file__).resolve().parents[1])  # vcb_lib importable from any cwd
        run_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, run_env.get("PYTHONPATH", "")) if p)
        cmd = launch_command(target, num_processes, config_file, cpu, port, num_machines=num_machines,
                             machine_rank=machine_rank, main_process_ip=main_process_ip)
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=run_env, cwd=cwd, errors="replace", preexec_fn=die_with_parent()) as proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                echo(line)
            rc = proc.wait()
        if rc == 0:
            return 0
        rank, cause = _first_failure(Path(errors), list(tail))
    who = f"rank {rank} failed first" if rank is not None else "the launch failed"
    raise LaunchError(f"{' '.join(target)} exited with code {rc}: {who}:\n{cause}", returncode=rc, rank=rank,
                      root_cause=cause)


def _first_failure(errors: Path, tail: list[str]) -> tuple[int | None, str]:
    """The earliest traceback a worker rank wrote; else the first traceback in the output."""
    reports = [json.loads(p.read_text()) for p in sorted(errors.glob("rank-*.json"))]
    if reports:
        first = min(reports, key=lambda r: r["time"])
        return first["rank"], first["traceback"].rstrip()
    return None, _first_traceback(tail) or "\n".join(tail[-40:])


def _first_traceback(lines: list[str]) -> str | None:
    """The first ``Traceback ...`` block: header, indented frames, then the exception line. Lines of
    a block share its ``[rankN]:`` prefix (torchrun's), so another rank's interleaved lines are skipped."""
    split = [re.match(r"^(\[rank\d+\]:\s?)?(.*)$", line).groups() for line in lines]  # (prefix, text)
    for i, (prefix, text) in enumerate(split):
        if text.startswith("Traceback (most recent call last):"):
            block = [lines[i]]
            for line, (p, t) in zip(lines[i + 1:], split[i + 1:]):
                if p != prefix:
                    continue
                block.append(line)
                if t and not t.startswith((" ", "\t")):
                    break
            return "\n".join(block)
    return None


def train_subprocess(params: str | os.PathLike, method: str, candidates: str | os.PathLike, out: str | os.PathLike,
                     *, model: str | None = None, overrides: Sequence[str] = (), resume: bool = False,
                     num_processes: int | None = None,
                     config_file: str | os.PathLike | None = None, cpu: bool | None = None, **kwargs) -> int:
    """``python -m vcb_lib.trainers`` under :func:`launch_subprocess` (starting from ``model``,
    default ``models.policy``), with the params file's
    ``training.accelerate_config`` / ``training.num_processes`` unless given; ``cpu`` defaults to
    ``run.device == "cpu"``. One node of a multi-node run: pass ``num_machines``, ``machine_rank``,
    ``main_process_ip`` and ``port`` (on to :func:`launch_subprocess`); ``num_processes`` counts all nodes' ranks."""
    from vcb_lib.config import load_params, resolve_path

    cfg = load_params(params, list(overrides))
    args = ["-m", "vcb_lib.trainers", "--params", str(Path(params).resolve()), "--method", method,
            "--candidates", str(Path(candidates).resolve()), "--out", str(Path(out).resolve())]
    if model is not None:
        args += ["--model", str(model)]
    for o in overrides:
        args += ["--set", o]
    if resume:
        args.append("--resume")
    n = num_processes or cfg.training.num_processes
    config = config_file if config_file is not None else resolve_path(cfg.training.accelerate_config)
    return launch_subprocess(args, n, config, cfg.run.device == "cpu" if cpu is None else cpu, **kwargs)


# --------------------------------------------------------------------------------------------
# The worker wrapper: python -m vcb_lib.launch (script.py | -m module) args...
# --------------------------------------------------------------------------------------------


def _worker(argv: list[str]) -> None:
    """Run the target as ``__main__``; if it raises, record the traceback for the launcher, then re-raise."""
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        raise SystemExit("usage: python -m vcb_lib.launch (script.py | -m module) [args...]")
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            _record(f"SystemExit: {e.code}")
        raise
    except BaseException:
        _record(traceback.format_exc())
        raise


def _record(text: str) -> None:
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    with contextlib.suppress(OSError):
        Path(folder, f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "time": time.time(), "traceback": text}))


def _die_with_launcher() -> None:
    """In a rank that :func:`launch_subprocess` started (``OWNER_ENV`` set), on Linux: SIGKILL when
    the launcher that started this rank dies. A launcher that died before the request took effect
    left this rank re-parented (to init or a sub-reaper), whose ancestors no longer include the
    owner: the rank then ends at once."""
    owner, prctl = os.environ.get(OWNER_ENV, ""), _prctl()
    if not owner.isdigit() or prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not _has_ancestor(os.getppid(), int(owner)):
        os.kill(os.getpid(), signal.SIGKILL)


def _has_ancestor(pid: int, ancestor: int, depth: int = 8) -> bool:
    """Whether ``ancestor`` is ``pid`` or one of its first ``depth`` ancestors (read from /proc)."""
    for _ in range(depth):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...
    return False


if __name__ == "__main__":
    _die_with_launcher()  # here, not in _worker: it concerns this rank process (tests call _worker in-process)
    _worker(sys.argv[1:])
