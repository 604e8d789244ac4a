"""The one checkpoint format of both trainers (issue 31): the offline :class:`~vcb_lib.trainers.Trainer`'s
``checkpoints/step-NNNNNN/`` and the on-policy rounds' ``rounds/round-NNNN/`` (``vcb_lib.stages.online``).

A checkpoint is a folder written without pickle: tensors in safetensors (``model.safetensors``, RNG
states), optimizer and scheduler states as state dicts of tensors, numbers, lists and dicts
(``optimizer.pt``, ``scheduler.pt``: read back with ``torch.load(weights_only=True)``, which runs no
code), ``trainer_state.json`` (the trainer's position: its ``format`` number, step or round, ...) and,
written LAST, ``checksums.json`` (size and sha256 of every other file then in the folder). A folder
without its checksums was not finished.

On resume a trainer walks its checkpoints newest first and takes the first that :func:`verify`
passes (every listed file present with its size and sha256, ``trainer_state.json`` listed, readable,
of the trainer's format and for the folder's step, the files the state needs listed) and whose files
:func:`read_file` reads without unpickling; a damaged one is renamed ``damaged-<name>`` beside it
(:func:`set_aside`, with a :class:`CheckpointWarning` naming it and what is wrong), out of the way of
later saves and pruning, kept for a look.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vcb_lib.io import atomic_write_text

Tensor = torch.Tensor

STATE_FILE, CHECKSUMS_FILE = "trainer_state.json", "checksums.json"
MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.pt"
SCHEDULER_FILE, SCALER_FILE = "scheduler.pt", "scaler.pt"
ADAPTER_FILE = "adapter.safetensors"  # LoRA: the adapters' tensors instead of model.safetensors
DAMAGED_PREFIX = "damaged-"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped on resume (damaged, or unreadable without unpickling)."""


# --------------------------------------------------------------------------------------------
# RNG states without pickle
# --------------------------------------------------------------------------------------------


def rng_states() -> tuple[dict[str, Tensor], dict]:
    """This process's RNG states: torch generators as tensors (CPU; CUDA where it is in use) for
    safetensors, and Python's ``random`` and numpy's global states as JSON-ready values."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"torch_cuda_{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    plain = {"python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
             "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    return tensors, plain


def set_rng_states(tensors: dict[str, Tensor], plain: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.rsplit("_", 1)[1]), t) for k, t in tensors.items() if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        for i, t in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(t, i)
    py, npy = plain["python"], plain["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    np.random.set_state({"bit_generator": npy["bit_generator"], "has_gauss": npy["has_gauss"], "gauss": npy["gauss"],
                         "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]}})


# --------------------------------------------------------------------------------------------
# Checksums, written last; verification
# --------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksum_list(folder: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` but checksums.json."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}


def seal(folder: Path, state: dict) -> None:
    """Finish checkpoint ``folder`` (its other files written): ``trainer_state.json``, then, last,
    ``checksums.json`` of every file in it (atomically)."""
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    atomic_write_text(folder / CHECKSUMS_FILE, json.dumps({"files": checksum_list(folder)}, indent=2) + "\n")


def verify(folder: Path, *, state_keys: Sequence[str], format: int, needed_files: Callable[[dict], list[str]],
           step_key: str = "step", name_pattern: re.Pattern | None = None) -> str | None:
    """What is wrong with checkpoint ``folder``, or None when it is intact: checksums.json lists
    files that are all present with their size and sha256 (cheap checks first), trainer_state.json
    among them, a JSON object with ``state_keys``, of ``format``, for the step (``state[step_key]``)
    that the folder's name says (``name_pattern``'s group 1), and listing ``needed_files(state)``."""
    try:
        listed = json.loads((folder / CHECKSUMS_FILE).read_text())["files"]
        sizes = {name: int(v["size"]) for name, v in listed.items()}
        hashes = {name: str(v["sha256"]) for name, v in listed.items()}
    except FileNotFoundError:
        return f"no {CHECKSUMS_FILE} (damaged, or written before checkpoints had one)"
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return f"{CHECKSUMS_FILE} is unreadable ({type(e).__name__}: {e})"
    outside = [n for n in listed if Path(n).is_absolute() or ".." in Path(n).parts]
    if outside:
        return f"{CHECKSUMS_FILE} lists paths outside the folder: {outside}"
    for name, size in sizes.items():  # cheap checks first
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    for name, digest in hashes.items():
        if file_sha256(folder / name) != digest:
            return f"{name} does not match its sha256"
    if STATE_FILE not in listed:
        return f"{CHECKSUMS_FILE} does not list {STATE_FILE}"
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        absent = [k for k in state_keys if k not in state] if isinstance(state, dict) else ["a JSON object"]
    except ValueError as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    if absent:
        return f"{STATE_FILE} lacks {absent}"
    if state["format"] != format:
        return f"{STATE_FILE} has format {state['format']!r}, this trainer reads {format}"
    match = name_pattern.match(folder.name) if name_pattern is not None else None
    if match and int(match.group(1)) != state[step_key]:
        return f"{STATE_FILE} is for {step_key} {state[step_key]}, the folder for {step_key} {int(match.group(1))}"
    unlisted = [n for n in needed_files(state) if n not in listed]
    if unlisted:
        return f"{CHECKSUMS_FILE} does not list {unlisted}"
    return None


def read_file(folder: Path, name: str):
    """One file of a verified checkpoint, read without unpickling: safetensors -> {name: tensor},
    JSON -> its value, anything else through ``torch.load(weights_only=True)``. Raises ValueError
    naming the file when it cannot be read so (a format error, or a global weights_only refuses)."""
    try:
        if name.endswith(".safetensors"):
            return load_file(str(folder / name))
        if name.endswith(".json"):
            return json.loads((folder / name).read_text())
        return torch.load(folder / name, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a format error, or a global weights_only refuses
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0]).split(". Please")[0]
        raise ValueError(f"{name}: {type(e).__name__}: {why}") from e


def set_aside(folder: Path, problem: str, *, stacklevel: int = 2) -> Path:
    """Rename damaged checkpoint ``folder`` to ``damaged-<name>`` beside it (replacing an older one
    of that name) and warn (:class:`CheckpointWarning`) naming it and ``problem``. Returns the new path."""
    aside = folder.with_name(DAMAGED_PREFIX + folder.name)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    warnings.warn(f"checkpoint {folder} is damaged: {problem}; skipped (moved to {aside.name})",
                  CheckpointWarning, stacklevel=stacklevel + 1)
    return aside
