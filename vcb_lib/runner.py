"""Run the ordered notebooks headless with papermill: ``python -m vcb_lib run PARAMS.yaml``.

Each notebook ``notebooks/NN_<name>.ipynb`` is one stage. The runner validates the parameters,
writes the resolved config to ``outputs/<run>/config.yaml``, checks that every parameter it
injects is declared in each notebook's ``parameters`` cell (papermill itself only warns), then
executes the notebooks in order into ``outputs/<run>/notebooks/``.

Every process of a run dies with the runner, even when it is killed by SIGKILL (Linux): each
notebook's kernel is started with ``launch.die_with_parent`` (ipykernel alone would notice only at
its next 1 s poll of its parent), and the training processes it launches die with the kernel
(``vcb_lib.launch``).

The runner talks to each kernel over IPC (Unix sockets in the temporary folder, beside the
connection file), not TCP: no port is opened, and ipykernel, which warns at every start
"Kernel is running over TCP without encryption ..." only for TCP without CurveZMQ keys, has nothing
to warn about, so the runner's progress lines are not buried under it. Nothing else is filtered:
whatever else a kernel prints still reaches the terminal.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vcb_lib.config import PROJECT_ROOT, Config, load_params
from vcb_lib.io import folder_lock

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
HEADLESS_OVERRIDES = ["ablation.interactive=false"]  # widget event loops hang headless runs


class RunnerError(RuntimeError):
    """Bad stage selection or a notebook that does not declare what the runner injects."""


class StageFailed(RuntimeError):
    """A notebook raised; carries what a user needs to find the failing cell."""

    def __init__(self, notebook: str, cell_index: int | None, exception: str, partial: Path):
        self.notebook, self.cell_index, self.exception, self.partial = notebook, cell_index, exception, partial
        cell = f"cell {cell_index} (0-based, in the source notebook)" if cell_index is not None else "a cell"
        super().__init__(f"{notebook} failed in {cell}: {exception}\n  partial output notebook: {partial}")


@dataclass(frozen=True)
class Stage:
    path: Path

    @property
    def stem(self) -> str:  # "00_theory"
        return self.path.stem

    @property
    def number(self) -> str:  # "00"
        return self.stem.split("_", 1)[0]

    @property
    def name(self) -> str:  # "theory"
        return self.stem.split("_", 1)[1]

    def matches(self, key: str) -> bool:
        return key in (self.stem, self.number, self.name)


def discover(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Stage]:
    """The ordered stages: ``NN_<name>.ipynb`` files sorted by name."""
    paths = sorted(p for p in Path(notebooks_dir).glob("*.ipynb") if re.fullmatch(r"\d\d_\w+", p.stem))
    if not paths:
        raise RunnerError(f"no notebooks named NN_<name>.ipynb in {notebooks_dir}")
    return [Stage(p) for p in paths]


def select(stages: list[Stage], only: list[str] | None = None, start: str | None = None) -> list[Stage]:
    """Stages named by ``only`` (stem, number or name), or every stage from ``start`` on."""
    allowed = ", ".join(s.stem for s in stages)

    def find(key: str) -> int:
        for i, stage in enumerate(stages):
            if stage.matches(key):
                return i
        raise RunnerError(f"unknown stage {key!r}; allowed: {allowed} (or their number or name)")

    if only and start:
        raise RunnerError("use either --only or --from, not both")
    if only:
        return [stages[i] for i in sorted({find(k) for k in only})]
    if start:
        return stages[find(start):]
    return stages


def declared_parameters(path: Path) -> dict[str, dict]:
    import papermill

    return papermill.inspect_notebook(str(path))


def check_parameters(stage: Stage, injected: dict) -> None:
    """Fail before running anything when a notebook does not declare an injected parameter."""
    declared = declared_parameters(stage.path)
    if not declared:
        raise RunnerError(f"{stage.path} has no cell tagged 'parameters'; the runner injects {sorted(injected)}")
    missing = sorted(set(injected) - set(declared))
    if missing:
        raise RunnerError(f"{stage.path} does not declare parameter(s) {missing} that the runner injects; "
                          f"its parameters cell declares {sorted(declared)}")


MAX_SOCKET_PATH = 100  # a Unix socket path holds at most 107 bytes (Linux; 103 on macOS)


def use_ipc(km) -> None:
    """Before its kernel starts, move kernel manager ``km`` from TCP to IPC: its connection file
    ``<tmp>/vcb-kernel-XXXX.json`` and its sockets ``<tmp>/vcb-kernel-XXXX-ipc-<n>``, both removed
    by jupyter_client when the kernel shuts down. Left on TCP where Unix sockets are missing
    (Windows) or the temporary folder's path is too long for one."""
    if os.name != "posix" or km.connection_file:
        return
    fd, path = tempfile.mkstemp(prefix="vcb-kernel-", suffix=".json")
    os.close(fd)
    ip = path.removesuffix(".json") + "-ipc"
    if len(ip) + 6 > MAX_SOCKET_PATH:  # "-<port>"
        os.remove(path)
        return
    km.connection_file, km.transport, km.ip = path, "ipc", ip


@functools.cache
def kernel_manager_class() -> type:
    """jupyter_client's ``AsyncKernelManager`` (nbclient's default), starting the kernel so that it
    gets SIGKILL the moment this process dies (``start_kernel``'s keywords go to ``Popen``) and
    talking to it over IPC (:func:`use_ipc`)."""
    from jupyter_client import AsyncKernelManager

    from vcb_lib.launch import die_with_parent

    class KernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            use_ipc(self)
            preexec = die_with_parent()
            if preexec is not None:
                kw.setdefault("preexec_fn", preexec)
            return await super().start_kernel(**kw)

    return KernelManager


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def thread_limit(threads: int):
    """``run.threads`` > 0: inside, the processes started from here (notebook kernels, and through
    them accelerate's trainers: ``launch`` passes ``OMP_NUM_THREADS`` on) and this process's torch
    use that many intra-op threads; everything is restored after. 0 changes nothing."""
    if threads <= 0:
        yield
        return
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    torch = sys.modules.get("torch")  # only when already imported: the runner itself never needs it
    before = torch.get_num_threads() if torch is not None else None
    os.environ.update({k: str(threads) for k in THREAD_VARIABLES})
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch is not None:
            torch.set_num_threads(before)


def source_cell_index(executed: Path, exec_count: int | None) -> int | None:
    """Index, in the source notebook, of the executed cell numbered ``exec_count``: papermill's
    own index counts the cells it inserted (injected parameters, error banners)."""
    import nbformat

    inserted = {"injected-parameters", "papermill-error-cell-tag"}
    index = 0
    for cell in nbformat.read(str(executed), as_version=4).cells:
        if inserted & set(cell.metadata.get("tags", [])):
            continue
        if cell.cell_type == "code" and exec_count is not None and cell.get("execution_count") == exec_count:
            return index
        index += 1
    return None


def check_inputs(cfg: Config, *, log: Callable[[str], None] = print) -> None:
    """Your data and rewards, read and checked before any notebook runs: the prompt and candidate
    files (``user_data.DataError`` naming the file, row and column) and each reward spec
    (``reward_sources.RewardSourceError``); both are ``ConfigError`` s, printed without a traceback."""
    from vcb_lib import reward_sources

    for spec in (cfg.rewards.reward_model, cfg.rewards.evaluation):
        if spec:
            reward_sources.check(spec, rubric=cfg.rewards.judge_rubric)
    if not cfg.data.own:
        return
    from vcb_lib.data import task_of, task_prompts
    from vcb_lib.user_data import load_candidates

    task = task_of(cfg)
    counts = {split: len(task_prompts(task, split)) for split in ("train", "test", "ood")}
    found = f"your data: task {task.name!r}, " + ", ".join(f"{n} {split}" for split, n in counts.items() if n) + " prompts"
    if cfg.data.candidates:
        found += f"; {len(load_candidates(cfg.data, log=log))} candidates to import"
    log(found)


def run(params_path: str | Path, overrides: list[str] | None = None, *, only: list[str] | None = None,
        start: str | None = None, notebooks_dir: Path = NOTEBOOKS_DIR,
        log: Callable[[str], None] = print) -> Path:
    """Execute the selected notebooks in order; return the run folder. Raises ``StageFailed``."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    overrides = list(overrides or []) + HEADLESS_OVERRIDES
    params_path = Path(params_path).expanduser().resolve()
    cfg: Config = load_params(params_path, overrides)  # fails here, before any notebook, on bad params
    check_inputs(cfg, log=log)  # and on bad data files or reward specs
    stages = discover(notebooks_dir)
    stages = select(stages, only or cfg.run.stages or None, start)
    injected = {"params_path": str(params_path), "overrides": overrides}
    for stage in stages:
        check_parameters(stage, injected)

    with folder_lock(cfg.run_dir), thread_limit(cfg.run.threads):  # one writer per run folder: a second runner fails at once
        cfg.save()
        out_dir = cfg.run_dir / "notebooks"
        out_dir.mkdir(parents=True, exist_ok=True)
        log(f"run {cfg.run.name!r} -> {cfg.run_dir}  ({len(stages)} notebook(s), config hash {cfg.hash()})")
        t_run = time.monotonic()
        for i, stage in enumerate(stages, 1):
            out = out_dir / stage.path.name
            log(f"[{i}/{len(stages)}] {stage.stem} ...")
            t0 = time.monotonic()
            try:
                papermill.execute_notebook(str(stage.path), str(out), parameters=injected, cwd=str(stage.path.parent),
                                           progress_bar=sys.stderr.isatty(), log_output=False,
                                           kernel_manager_class=kernel_manager_class())
            except PapermillExecutionError as err:
                cell = source_cell_index(out, err.exec_count)
                raise StageFailed(stage.stem, cell, f"{err.ename}: {err.evalue}", out) from None
            log(f"[{i}/{len(stages)}] {stage.stem} done in {time.monotonic() - t0:.1f} s -> {out}")
        log(f"run {cfg.run.name!r} finished in {time.monotonic() - t_run:.1f} s")
    return cfg.run_dir
