"""The command line (python -m vcb_lib): a bad output root is one error line and exit code 2."""
import os

import pytest

from vcb_lib.__main__ import main
from vcb_lib.config import PROJECT_ROOT

SMOKE = str(PROJECT_ROOT / "params" / "smoke.yaml")


def run_00(output_root) -> list[str]:
    return ["run", SMOKE, "--set", f"run.output_root={output_root}", "--only", "00"]


def test_output_root_that_is_a_file_is_an_error_not_a_traceback(tmp_path, capsys):
    """The runner's first write is <output_root>/<run>/config.yaml, before any notebook runs: under a
    file it fails with NotADirectoryError, which the CLI reports with the path."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert main(run_00(afile)) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"error: Not a directory: '{afile / 'smoke'}'"
    assert "Traceback" not in err
    assert out == ""  # nothing ran: no "run 'smoke' -> ..." line, no notebook
    assert afile.read_text() == "not a folder"


def test_output_root_whose_parent_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(run_00(afile / "runs")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Not a directory: ") and str(afile / "runs") in err


def test_output_root_under_proc_is_an_error(capsys):
    assert main(run_00("/proc/nope")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/proc/nope" in err and "Traceback" not in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_root_is_an_error(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(run_00(ro)) == 2
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err
    assert err.startswith("error: Permission denied: ") and str(ro / "smoke") in err
