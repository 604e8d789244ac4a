"""The papermill runner: stage selection, parameter checks, failure report, the CLI."""
import json
import os
import subprocess
import sys

import nbformat
import pytest

from conftest import make_notebook
from vcb_lib.__main__ import main
from vcb_lib.config import PROJECT_ROOT
from vcb_lib.runner import RunnerError, StageFailed, discover, run, select

WRITE_METRICS = (
    "from vcb_lib.config import load_params\n"
    "from vcb_lib.io import write_json\n"
    "cfg = load_params(params_path, overrides)\n"
    "write_json(cfg.stage_dir('{stem}') / 'metrics.json', {{'gamma': cfg.training.gamma, 'interactive': cfg.ablation.interactive}})"
)


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    make_notebook(d / "00_first.ipynb", WRITE_METRICS.format(stem="00_first"))
    make_notebook(d / "01_second.ipynb", WRITE_METRICS.format(stem="01_second"))
    (d / "scratch.ipynb").write_text("{}")  # not a stage: no NN_ prefix
    return d


def test_discover_and_select(nbdir):
    stages = discover(nbdir)
    assert [s.stem for s in stages] == ["00_first", "01_second"]
    assert [s.stem for s in select(stages, only=["second"])] == ["01_second"]
    assert [s.stem for s in select(stages, only=["01", "00_first"])] == ["00_first", "01_second"]
    assert [s.stem for s in select(stages, start="01_second")] == ["01_second"]
    with pytest.raises(RunnerError, match=r"unknown stage 'third'; allowed: 00_first, 01_second"):
        select(stages, only=["third"])


def test_run_executes_in_order_with_overrides(nbdir, tmp_path, smoke_params):
    lines = []
    run_dir = run(smoke_params, [f"run.output_root={tmp_path / 'out'}", "training.gamma=0.25"],
                  notebooks_dir=nbdir, log=lines.append)
    assert run_dir == tmp_path / "out" / "smoke"
    for stem in ("00_first", "01_second"):
        metrics = json.loads((run_dir / stem / "metrics.json").read_text())
        assert metrics == {"gamma": 0.25, "interactive": False}  # headless runs switch widgets off
        executed = nbformat.read(str(run_dir / "notebooks" / f"{stem}.ipynb"), as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert (run_dir / "config.yaml").is_file()
    assert lines[1].startswith("[1/2] 00_first") and any(l.startswith("[2/2] 01_second done in") for l in lines)


def test_failure_names_notebook_cell_exception_and_partial_output(nbdir, tmp_path, smoke_params):
    make_notebook(nbdir / "01_second.ipynb", "x = 1", "raise ValueError('the reward is NaN')", "y = 2")
    with pytest.raises(StageFailed) as err:
        run(smoke_params, [f"run.output_root={tmp_path}"], notebooks_dir=nbdir, log=lambda m: None)
    e = err.value
    assert e.notebook == "01_second"
    assert "ValueError: the reward is NaN" in e.exception
    source = nbformat.read(str(nbdir / "01_second.ipynb"), as_version=4)
    assert "raise ValueError" in source.cells[e.cell_index].source  # the index points at the failing cell
    assert "cell 2 (0-based, in the source notebook)" in str(e)
    assert e.partial == tmp_path / "smoke" / "notebooks" / "01_second.ipynb"
    assert (tmp_path / "smoke" / "00_first" / "metrics.json").is_file()  # earlier stages ran


def test_undeclared_parameter_fails_before_running(nbdir, tmp_path, smoke_params):
    make_notebook(nbdir / "01_second.ipynb", "pass", parameters='params_path: str = "x"  # only this one')
    with pytest.raises(RunnerError, match=r"does not declare parameter\(s\) \['overrides'\]"):
        run(smoke_params, [f"run.output_root={tmp_path}"], notebooks_dir=nbdir, log=lambda m: None)
    assert not (tmp_path / "smoke" / "00_first").exists()  # nothing ran
    make_notebook(nbdir / "01_second.ipynb", "pass", parameters=None)
    with pytest.raises(RunnerError, match="has no cell tagged 'parameters'"):
        run(smoke_params, [f"run.output_root={tmp_path}"], notebooks_dir=nbdir, log=lambda m: None)


def test_cli_reports_bad_params_and_failures(tmp_path, capsys, smoke_params):
    assert main(["run", str(smoke_params), "--set", "training.gama=1"]) == 2
    assert "Did you mean 'training.gamma'?" in capsys.readouterr().err
    assert main(["list-params", str(smoke_params), "--set", "training.gamma=0.7"]) == 0
    assert "gamma: 0.7  # γ, Eq. 9" in capsys.readouterr().out


def test_cli_failure_exit_code_and_report(tmp_path):
    nbdir = tmp_path / "nb"
    make_notebook(nbdir / "00_boom.ipynb", "raise RuntimeError('boom')")
    proc = subprocess.run([sys.executable, "-m", "vcb_lib", "run", str(PROJECT_ROOT / "params/smoke.yaml"),
                           "--notebooks", str(nbdir), "--set", f"run.output_root={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED: 00_boom failed in cell" in proc.stderr and "RuntimeError: boom" in proc.stderr
    assert "partial output notebook:" in proc.stderr


def test_kernels_talk_over_ipc_and_print_no_tcp_warning(tmp_path, capfd, monkeypatch, smoke_params):
    """Issue #23: ipykernel's "Kernel is running over TCP without encryption ..." buried the progress
    lines at every stage. Over IPC it has nothing to warn about; what else a kernel writes to its
    stderr still reaches the terminal, and the kernel's socket and connection files are removed."""
    import shutil
    import tempfile

    nbdir = tmp_path / "nb"
    make_notebook(nbdir / "00_only.ipynb",
                  "import os\nfrom ipykernel.connect import get_connection_info\n"
                  "print('transport', get_connection_info(unpack=True)['transport'])\n"
                  "os.write(2, b'kernel stderr reaches the user\\n')")
    sockets = tempfile.mkdtemp(prefix="vcbk-")  # short: a Unix socket path has at most 107 bytes
    try:
        with monkeypatch.context() as m:
            m.setattr(tempfile, "tempdir", sockets)  # where the runner puts this kernel's files
            run_dir = run(smoke_params, [f"run.output_root={tmp_path}"], notebooks_dir=nbdir, log=print)
        assert os.listdir(sockets) == []
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    out, err = capfd.readouterr()
    assert "[1/1] 00_only done in" in out
    assert "without encryption" not in out + err
    assert "kernel stderr reaches the user" in err
    executed = nbformat.read(str(run_dir / "notebooks" / "00_only.ipynb"), as_version=4)
    assert "transport ipc" in "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
