"""The command line (python -m vcb_lib): a bad output root, or an input file that is not UTF-8 YAML
holding a mapping, is one error line and exit code 2."""
import errno
import os
import re

import pytest

from vcb_lib.__main__ import main
from vcb_lib.config import PROJECT_ROOT, ConfigError

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


def test_read_only_output_root_is_an_error(tmp_path, capsys, monkeypatch):
    """A folder the process may not write into (mode 0o500): the kernel's EACCES for a non-root user.
    Root writes into it anyway, so ``os.mkdir`` answers under it as the kernel answers everyone else,
    and the test runs (and asserts) whoever runs it."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(ro):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        assert main(run_00(ro)) == 2
    finally:
        ro.chmod(0o700)
    out, err = capsys.readouterr()
    assert err.strip() == f"error: Permission denied: '{ro / 'smoke'}'" and out == ""
    assert list(ro.iterdir()) == []


def test_run_folder_whose_config_is_a_folder_is_an_error(tmp_path, capsys):
    """Unwritable for every user, root included: ``<run>/config.yaml`` is a non-empty folder, which the
    atomic write (temporary file + rename) cannot replace; the folder is left as it was."""
    (tmp_path / "smoke" / "config.yaml" / "keep").mkdir(parents=True)
    assert main(run_00(tmp_path)) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and str(tmp_path / "smoke" / "config.yaml") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert [p.name for p in (tmp_path / "smoke" / "config.yaml").iterdir()] == ["keep"]


# ---- input files that are not UTF-8 YAML mappings: one error line naming the file and what was expected ----

BINARY = bytes(range(256)) * 4  # not UTF-8 (0x80 is a continuation byte with no lead)


@pytest.mark.parametrize("command", ["run", "list-params"])
def test_a_binary_params_file_is_an_error_not_a_traceback(tmp_path, capsys, command):
    path = tmp_path / "params.yaml"
    path.write_bytes(BINARY)
    assert main([command, str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (f"error: {path} is not a params file: expected UTF-8 YAML text (a mapping of sections run:, "
                           "training:, ...), but byte 128 is not UTF-8 (invalid start byte)")
    assert out == ""


@pytest.mark.parametrize("text, expected", [
    ("run: [unclosed\n", "is not valid YAML"),
    ("- run\n- training\n", "must be a mapping of sections (run:, training:, ...), got list"),
    ("just words\n", "must be a mapping of sections (run:, training:, ...), got str"),
])
def test_a_params_file_that_is_not_a_yaml_mapping_is_named(tmp_path, capsys, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert main(["list-params", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} {expected}") and "Traceback" not in err


def test_a_binary_sweep_file_is_an_error_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(BINARY)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {path} is not a sweep file: expected UTF-8 YAML text (a mapping with keys "
                           "['name', 'base', 'set', 'grid', 'points']), but byte 128 is not UTF-8 (invalid start byte)")
    path.write_text("- name\n- base\n")
    assert main(["sweep", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path} must be a mapping with keys ['name', 'base', 'set', 'grid', 'points'], got list")


def test_a_binary_or_folder_judgment_template_file_is_a_config_error(tmp_path):
    """What the command line prints as one line (a ``ConfigError``), naming the file and what was expected."""
    from vcb_lib.judgments import JudgmentTemplateError, load_templates

    path = tmp_path / "judgments.yaml"
    path.write_bytes(BINARY)
    with pytest.raises(ConfigError) as err:
        load_templates(path)
    assert isinstance(err.value, JudgmentTemplateError) and str(err.value) == (
        f"{path}: not a judgment template file: expected UTF-8 YAML text (a mapping with the keys context, sentiment, "
        "assistant), but byte 128 is not UTF-8 (invalid start byte)")
    with pytest.raises(JudgmentTemplateError, match=re.escape(f"{tmp_path}: a folder, not a judgment template file")):
        load_templates(tmp_path)
