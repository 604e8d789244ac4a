"""Atomic file writes: a killed run never leaves a half-written file that looks whole."""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``,
    kernel >= 4.7); elsewhere set and restored at once (under a lock: ``os.umask`` is per process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _plain_open_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: an existing file keeps its own, a new one
    gets 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    The file gets the mode a plain ``open(path, "w")`` would give it (``mkstemp``'s is 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, _plain_open_mode(path))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def replace_folder(tmp: str | Path, target: str | Path) -> Path:
    """Put the finished folder ``tmp`` at ``target``: an earlier ``target`` is moved aside before the
    rename and deleted after it, so a crash leaves one whole version (or the aside copy), never a mix."""
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(".old-" + target.name)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON with sorted keys and 2-space indent, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(obj: Any) -> Any:
    """numpy/torch scalars and arrays, Paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# One writer per run folder
# --------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_HELD: dict[str, list] = {}  # folder -> [open file, depth]: this process's locks (re-entrant)
_HELD_GUARD = threading.Lock()


class FolderBusy(RuntimeError):
    """Another process is writing this run folder."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    return f"PID {info.get('pid', '?')} ({info.get('command', '?')}, since {info.get('since', '?')})"


class folder_lock:
    """``with folder_lock(run_dir):`` — this process is the one writer of ``run_dir`` until the
    block ends. A second process fails at once with :class:`FolderBusy` naming the holder's PID
    and command. The lock is the kernel's (``flock``), so a holder killed with -9 leaves nothing
    to clean up: the next writer takes the folder over. Re-entrant within one process."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()

    def __enter__(self) -> Path:
        import datetime
        import fcntl
        import sys

        key = str(self.folder)
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                return self.folder
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / LOCK_FILE
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise FolderBusy(f"{self.folder} is being written by {_holder(path)}; wait for it to finish, "
                                 "or give this run another run.name") from None
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:300],
                                "since": datetime.datetime.now().isoformat(timespec="seconds")}))
            f.flush()
            _HELD[key] = [f, 1]
        return self.folder

    def __exit__(self, *exc) -> None:
        import fcntl

        key = str(self.folder)
        with _HELD_GUARD:
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                entry[0].close()
                del _HELD[key]
