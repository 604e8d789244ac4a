"""The one freshness rule: an artefact is current when its manifest holds the config slice it
was built from, equal to the current one, and checksums that its files still match.

Every artefact a stage writes (a file such as ``02_candidates/candidates.parquet``, or a folder
such as ``01_models/sft/``) has one manifest beside it, ``<name>.manifest.json``::

    {"stage": "02_generate",                      # the notebook that builds it (named in errors)
     "state": "complete",                         # "building" while its stage works on it
     "key": {"sampling.n": 4, ...},               # the config slice it depends on, flat
     "files": {"candidates.parquet": {"sha256": "...", "bytes": 123}}}

:meth:`Artefact.status` says what a reader may do with it: ``current`` (read it), ``missing``,
``stale`` (built for another config: the keys that changed are named), ``corrupt`` (a file is
gone, truncated or altered) or ``building`` (its stage was interrupted; the key says whether the
work in progress can be resumed). :meth:`Artefact.require` raises unless it is current; a stage
rebuilds whatever is not. The manifest is written last, atomically, so a killed stage never
leaves an artefact that reads as complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcb_lib.io import read_json, write_json

SUFFIX = ".manifest.json"
STATES = ("current", "missing", "stale", "corrupt", "building")


class ArtefactError(RuntimeError):
    """An artefact that must not be read: missing, built for another config, or damaged."""

    def __init__(self, artefact: "Artefact", state: str, detail: str):
        self.artefact, self.state, self.detail = artefact, state, detail
        super().__init__(f"{artefact.label} is {state}: {detail}; {artefact.remedy}")


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256: each file is hashed once per process


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def key_hash(key: dict[str, Any]) -> str:
    """Short hash of a config slice (for folder names and logs)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["sampling.temperature: 1.0 -> 0.5", ...]`` for every key whose value differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if a != b:
            out.append(f"{k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


@dataclass(frozen=True)
class Artefact:
    """A file or folder that a stage builds from a slice of the config.

    ``include``: for a folder, the glob patterns (relative to it) of the files that make its
    content; work state beside them (checkpoints, shards) is left out. ``stage``: the notebook
    that builds it, e.g. ``"02_generate"``."""

    path: Path
    stage: str
    key: dict
    include: tuple[str, ...] = ("*",)

    @property
    def manifest_path(self) -> Path:
        return self.path.with_name(self.path.name + SUFFIX)

    @property
    def label(self) -> str:
        parts = self.path.parts
        return "/".join(parts[-2:]) if len(parts) >= 2 else str(self.path)

    @property
    def remedy(self) -> str:
        number = self.stage.split("_", 1)[0]
        return f"run stage {self.stage} first (python -m vcb_lib run PARAMS --from {number}) to rebuild it"

    def files(self) -> list[Path]:
        """The content files as they are on disk now (sorted)."""
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            return []
        found = {p for pattern in self.include for p in self.path.glob(pattern) if p.is_file()}
        return sorted(p for p in found if not p.name.startswith("."))

    def _name(self, p: Path) -> str:
        return p.name if p == self.path else p.relative_to(self.path).as_posix()

    def manifest(self) -> dict | None:
        try:
            record = read_json(self.manifest_path)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {"state": "unreadable"}
        return record if isinstance(record, dict) else {"state": "unreadable"}

    def status(self) -> tuple[str, str]:
        """``(state, detail)``; state is one of :data:`STATES`."""
        record = self.manifest()
        if record is None:
            return "missing", f"no manifest at {self.manifest_path}"
        if record.get("state") == "unreadable":
            return "corrupt", f"its manifest {self.manifest_path} is unreadable"
        if record.get("key") != self.key:
            changes = changed_keys(record.get("key") or {}, self.key)
            return "stale", "built for another config (" + "; ".join(changes[:8]) + \
                (f"; and {len(changes) - 8} more" if len(changes) > 8 else "") + ")"
        if record.get("state") != "complete":
            return "building", "its stage did not finish"
        for name, want in (record.get("files") or {}).items():
            p = self.path if record.get("kind") == "file" else self.path / name
            if not p.is_file():
                return "corrupt", f"{p} is missing"
            if p.stat().st_size != want["bytes"]:
                return "corrupt", f"{p} has {p.stat().st_size} bytes, its manifest says {want['bytes']}"
            if file_sha256(p) != want["sha256"]:
                return "corrupt", f"{p} does not match its checksum"
        if not record.get("files"):
            return "corrupt", "its manifest lists no files"
        return "current", ""

    def current(self) -> bool:
        return self.status()[0] == "current"

    def require(self) -> Path:
        """The path, when current; else raise :class:`ArtefactError` naming the state and the remedy."""
        state, detail = self.status()
        if state != "current":
            raise ArtefactError(self, "not built yet" if state == "missing" else
                                "unfinished" if state == "building" else state, detail)
        return self.path

    def resumable(self) -> bool:
        """True when work left at ``path`` was started for this same key (resume it); False when
        it belongs to another config or to nobody (start afresh)."""
        record = self.manifest()
        return bool(record) and record.get("key") == self.key

    def begin(self) -> None:
        """Mark the artefact as being built for this key (before its stage writes anything)."""
        write_json(self.manifest_path, {"stage": self.stage, "state": "building", "key": self.key})

    def seal(self, **info: Any) -> Path:
        """Checksum the content files and write the manifest (last): the artefact is current."""
        files = self.files()
        if not files:
            raise FileNotFoundError(f"nothing to seal at {self.path} (patterns {list(self.include)})")
        record = {"stage": self.stage, "state": "complete", "key": self.key, **info,
                  "kind": "file" if self.path.is_file() else "folder",
                  "files": {self._name(p): {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}}
        write_json(self.manifest_path, record)
        return self.path

    def invalidate(self) -> None:
        self.manifest_path.unlink(missing_ok=True)


def remove(path: Path) -> None:
    """Delete an artefact's file or folder and its manifest."""
    import shutil

    Path(str(path) + SUFFIX).unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        os.remove(path)
