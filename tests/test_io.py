"""Atomic writes (vcb_lib.io): content, and the mode a plain open(path, "w") would give."""
import os
import stat

import pytest

from vcb_lib import io


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_gets_the_mode_of_a_plain_open(tmp_path, umask, mask, want):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    for writer, name in ((io.atomic_write_text, "a.txt"), (io.write_json, "a.json")):
        path = writer(tmp_path / "sub" / name, "hello")
        assert mode(path) == mode(plain) == want  # not mkstemp's 0o600 whatever the umask
    assert io.read_json(tmp_path / "sub" / "a.json") == "hello"
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    path = tmp_path / "config.yaml"
    path.write_text("old")
    os.chmod(path, 0o640)
    io.atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640  # as open(path, "w") would leave it


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027])
def test_umask_is_read_without_changing_it(umask, mask):
    umask(mask)
    assert io._umask() == mask
    assert os.umask(mask) == mask  # still set
