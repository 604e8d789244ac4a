"""A researcher's own data: prompts from a file or dataset, and scored candidates to import as D_t.

Layer 3, beside the registry's tasks (``vcb_lib.tasks``); the ``data:`` section of the config says
where the data is and which columns hold what (``config.DataConfig``). Three readers share one
source rule (:func:`read_rows`): a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a folder
(a ``datasets.save_to_disk`` dataset, or files of one of those kinds, read in name order) or a
``datasets`` hub id (only when a params file names one; tests never reach a hub).

- :func:`load_prompts` -> task rows like the embedded tasks' (``data.load_prompts``)::

      {"prompt_id": "mydata-3f2a9c01d4", "prompt": "How do I ...?", "split": "train", "task": "mydata",
       "messages": [{"role": "system", ...}, {"role": "user", ...}]}   # only with a system prompt or chat input

  ``prompt`` is the user's last turn as text (what a reward reads); ``messages``, when present, is what
  the chat template reads (:func:`chat_input`).
- :func:`load_candidates` -> one row per candidate (``prompt_id``, ``prompt``, ``messages``, ``split``,
  ``k``, ``response``, ``reward`` (NaN when the file has none), ``response_ids`` (None unless given)),
  from three schemas: ``flat`` (a row per candidate), ``groups`` (a row per prompt with its
  ``completions`` and ``rewards``: the workbench's own ``trl-groups`` export) and ``ultrafeedback``
  (``instruction`` and ``completions`` ``[{response, overall_score}]``).
- :func:`fingerprint` -> what enters every artefact's key: the files' content (sha256) and the
  column mapping, so an edited file makes what was built from it stale.

Every error is a :class:`DataError` naming the file, the row (1-based) and the column, and what is
allowed; nothing is written before the data has been read whole.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

from vcb_lib.config import ConfigError, resolve_path

FILE_KINDS = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "test", "ood")
SCHEMAS = ("flat", "groups", "ultrafeedback")


class DataError(ConfigError):
    """A user's data file is wrong: the message names the file, the row and the column, and what is allowed."""


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Reading a source: file, folder or hub id -> rows
# --------------------------------------------------------------------------------------------


def _is_local(source: str) -> bool:
    path = resolve_path(source)
    return path.exists() or Path(source).suffix.lower() in FILE_KINDS or source.startswith((".", "/", "~"))


def _files(source: str, what: str) -> list[Path]:
    """The data files of a local source (a file, or a folder of files of one kind)."""
    path = resolve_path(source)
    if not path.exists():
        raise DataError(f"{what}: {path} does not exist (a .jsonl, .json, .csv or .parquet file, a folder, or a "
                        "datasets hub id; relative paths are relative to the project root)")
    if path.is_file():
        if path.suffix.lower() not in FILE_KINDS:
            raise DataError(f"{what}: {path} is a {path.suffix or 'suffix-less'} file; allowed: {', '.join(FILE_KINDS)}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_KINDS)
    kinds = {p.suffix.lower() for p in files}
    if not files:
        raise DataError(f"{what}: folder {path} holds no {', '.join(FILE_KINDS)} file and is not a saved datasets dataset")
    if len(kinds) > 1:
        raise DataError(f"{what}: folder {path} mixes {sorted(kinds)} files; give it files of one kind")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _read_json_file(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); expected {path.suffix[1:].upper()} text") from None
    if path.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {i} is not valid JSON ({err.msg}, column {err.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {i} is a JSON {type(row).__name__}; expected an object of columns")
            rows.append(row)
        return rows
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}, column {err.colno}); expected a list "
                        "of objects (or an object with a 'data'/'rows' list; or use .jsonl, one object per line)") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", data))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (one per row)")
    return data


def _read_table(path: Path) -> list[dict]:
    import pandas as pd

    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=object, keep_default_na=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); expected CSV text") from None
    except pd.errors.EmptyDataError:
        return []
    except Exception as err:  # pyarrow / the csv parser: the message says what is wrong
        raise DataError(f"{path}: cannot be read as {path.suffix[1:].upper()} ({type(err).__name__}: {err})") from None
    return frame.to_dict("records")


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (parquet, datasets) -> lists and Python scalars."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_rows(source: str, *, split: str = "train", what: str = "data") -> tuple[list[dict], str]:
    """The rows of ``source`` and where they came from (for messages): a file, a folder of files, a
    saved ``datasets`` dataset (a DatasetDict: its ``split``) or a hub id (``split``)."""
    if _is_local(source) and _is_saved_dataset(resolve_path(source)):
        import datasets

        path = resolve_path(source)
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{what}: saved dataset {path} has splits {list(data)}, not {split!r} (data.hub_split)")
            data = data[split]
        return [_plain(r) for r in data.to_list()], str(path)
    if _is_local(source):
        rows, files = [], _files(source, what)
        for f in files:
            rows += [_plain(r) for r in (_read_json_file(f) if f.suffix.lower() in (".jsonl", ".json") else _read_table(f))]
        where = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        if not rows:
            raise DataError(f"{what}: {where} is empty; expected one row per {'prompt' if what == 'data.prompts' else 'row'}")
        return rows, where
    import datasets  # a hub id, only when a params file names one

    try:
        data = datasets.load_dataset(source, split=split)
    except Exception as err:  # no network, unknown id, ...
        raise DataError(f"{what}: {source!r} is neither a local file or folder nor a loadable datasets hub id "
                        f"({type(err).__name__}: {str(err)[:300]})") from None
    return [_plain(r) for r in data.to_list()], f"{source} [{split}]"


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def source_digest(source: str) -> str:
    """A local source's content (sha256 of its files, 16 hex digits), or a hub id's name."""
    if not source:
        return ""
    if not _is_local(source):
        return f"hub:{source}"
    path = resolve_path(source)
    if not path.exists():
        return f"missing:{path}"
    stat = path.stat()
    latest = max([stat.st_mtime] + ([f.stat().st_mtime for f in path.rglob("*")] if path.is_dir() else []))
    return _content_digest(str(path), stat.st_size, latest)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def task_name(data) -> str:
    """``data.name``, else the file's or dataset's name (``prompts.jsonl`` -> ``prompts``)."""
    if data.name:
        return data.name
    source = data.prompts or data.candidates
    stem = Path(source.rstrip("/")).stem if _is_local(source) else source.split("/")[-1]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem) or "data"


def _column(row: dict, column: str, where: str, i: int, *, role: str) -> Any:
    if column not in row:
        close = difflib.get_close_matches(column, [str(c) for c in row], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"{where}: row {i} has no column {column!r} ({role}){hint} It has: {sorted(map(str, row))}")
    return row[column]


def _messages(value: Any, where: str, i: int, column: str) -> tuple[str, list[dict] | None]:
    """A prompt cell -> (its text: the last user turn, the chat messages or None for plain text)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: row {i}, column {column!r}: the prompt is empty; a prompt is non-empty text "
                            "or a list of chat messages")
        return value, None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for j, m in enumerate(value):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: row {i}, column {column!r}, message {j}: a message is "
                                f"{{'role': one of {ROLES}, 'content': text}}, got {str(m)[:120]}")
        if value[-1]["role"] != "user" or not value[-1]["content"].strip():
            raise DataError(f"{where}: row {i}, column {column!r}: the conversation must end with a non-empty user "
                            "turn (the policy writes the assistant's answer)")
        return value[-1]["content"], [{"role": m["role"], "content": m["content"]} for m in value]
    shown = "an empty list" if value == [] else f"{type(value).__name__} {str(value)[:80]!r}"
    raise DataError(f"{where}: row {i}, column {column!r}: a prompt must be text or a list of chat messages "
                    f"[{{role, content}}, ...], got {shown}")


def _prompt_row(row: dict, data, where: str, i: int, name: str, prompt_column: str | None = None) -> dict:
    """One source row -> a task row (no split yet unless the file gives one)."""
    column = prompt_column or data.prompt_column
    text, messages = _messages(_column(row, column, where, i, role="the prompt"), where, i, column)
    system = data.system_prompt
    if data.system_column:
        cell = _column(row, data.system_column, where, i, role="the system prompt")
        if cell is not None and not isinstance(cell, str):
            raise DataError(f"{where}: row {i}, column {data.system_column!r}: a system prompt is text, got "
                            f"{type(cell).__name__}")
        system = cell or system
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + (messages or [{"role": "user", "content": text}])
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False) if messages else text
    id_column = data.id_column or ("prompt_id" if "prompt_id" in row else "")
    if id_column:
        pid = _column(row, id_column, where, i, role="the prompt id")
        if pid is None or (isinstance(pid, float) and math.isnan(pid)) or not str(pid).strip():
            raise DataError(f"{where}: row {i}, column {id_column!r}: the prompt id is empty")
        pid = str(pid)
    else:
        pid = f"{name}-{_hash(name + '|' + key)[:10]}"
    out = {"prompt_id": pid, "prompt": text, "task": name, "_key": key}
    if messages:
        out["messages"] = messages
    if data.split_column:
        split = _column(row, data.split_column, where, i, role="the split")
        if split not in SPLITS:
            raise DataError(f"{where}: row {i}, column {data.split_column!r}: split {split!r} is not one of {SPLITS}")
        out["split"] = split
    return out


def _dedupe(rows: list[dict], data, where: str, log) -> list[dict]:
    """Each prompt once (same text and system prompt): keep its first row, or refuse (data.duplicates)."""
    seen: dict[str, int] = {}
    ids: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows, 1):
        if row["_key"] in seen:
            if data.duplicates == "error":
                raise DataError(f"{where}: row {i} repeats the prompt of row {seen[row['_key']]} "
                                f"({row['prompt'][:60]!r}); data.duplicates: error refuses repeats (drop keeps the first)")
            continue
        if row["prompt_id"] in ids:
            raise DataError(f"{where}: rows {ids[row['prompt_id']]} and {i} have the same prompt id {row['prompt_id']!r} "
                            "but different prompts; prompt ids must be unique")
        seen[row["_key"]], ids[row["prompt_id"]] = i, i
        out.append(row)
    if len(out) < len(rows):
        log(f"{where}: {len(rows) - len(out)} repeated prompt(s) dropped (the first row of each kept; data.duplicates)")
    return out


def _split(rows: list[dict], data) -> None:
    """The split rule: the test_percent% of prompts with the smallest hash of (split_seed, prompt id) are test."""
    if data.split_column:
        return
    ranked = sorted(rows, key=lambda r: _hash(f"{data.split_seed}|{r['prompt_id']}"))
    test = {r["prompt_id"] for r in ranked[:round(len(rows) * data.test_percent / 100)]}
    for r in rows:
        r["split"] = "test" if r["prompt_id"] in test else "train"


def _finish(rows: list[dict], where: str) -> list[dict]:
    for r in rows:
        r.pop("_key", None)
    if not any(r["split"] == "train" for r in rows):
        raise DataError(f"{where}: no train prompts ({len(rows)} prompts); the split column or rule must leave some")
    return rows


def _no_log(message: str) -> None:
    pass


def load_prompts(data, *, log=_no_log) -> list[dict]:
    """The task rows of ``data`` (a ``DataConfig``): its prompt file when set, else the prompts of its
    candidate file; checked, each prompt once, split."""
    if not data.prompts:
        return [{k: v for k, v in r.items() if k not in ("k", "response", "reward", "response_ids")}
                for r in _candidate_prompts(data, log=log)]
    rows, notes = _cached_prompts(_frozen(data), source_digest(data.prompts))
    for note in notes:
        log(note)
    return [dict(r) for r in rows]


def _frozen(data) -> str:
    import dataclasses

    return json.dumps(dataclasses.asdict(data), sort_keys=True)


def _thawed(frozen: str):
    from vcb_lib.config import DataConfig

    return DataConfig(**json.loads(frozen))


@functools.lru_cache(maxsize=8)
def _cached_prompts(frozen: str, digest: str) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    data, notes = _thawed(frozen), []
    raw, where = read_rows(data.prompts, split=data.hub_split, what="data.prompts")
    name = task_name(data)
    rows = _dedupe([_prompt_row(r, data, where, i, name) for i, r in enumerate(raw, 1)], data, where, notes.append)
    _split(rows, data)
    return tuple(_finish(rows, where)), tuple(notes)


def chat_input(row: dict) -> str | list[dict]:
    """What the chat template reads for a task row: its messages when it has them, else its text."""
    messages = row.get("messages")
    if messages is None or (isinstance(messages, float) and math.isnan(messages)):
        return row["prompt"]
    return json.loads(messages) if isinstance(messages, str) else _plain(messages)


# --------------------------------------------------------------------------------------------
# Candidates: a scored D_t from a file
# --------------------------------------------------------------------------------------------


def _schema(rows: list[dict], data, where: str) -> str:
    if data.candidates_format != "auto":
        return data.candidates_format
    first = rows[0]
    if "completions" in first:
        items = first["completions"] if isinstance(first["completions"], list) else []
        return "ultrafeedback" if items and isinstance(items[0], dict) and "response" in items[0] else "groups"
    if data.response_column in first:
        return "flat"
    raise DataError(f"{where}: cannot tell the candidates' schema from row 1's columns {sorted(map(str, first))}; "
                    f"allowed: flat (a row per candidate: {data.prompt_column}, {data.response_column}, "
                    f"{data.reward_column}), groups (a row per prompt: {data.prompt_column}, completions, rewards) or "
                    "ultrafeedback (instruction, completions [{response, overall_score}]); or set data.candidates_format")


def _reward(value: Any, where: str, i: int, column: str) -> float:
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: row {i}, column {column!r}: the reward is missing; rewards are finite numbers")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: row {i}, column {column!r}: reward {value!r} is not a number; rewards are "
                        "finite numbers") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: row {i}, column {column!r}: reward {value!r} is not finite; rewards are finite numbers")
    return x


def _response(value: Any, where: str, i: int, column: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):  # TRL's conversational completion
        value = value[0].get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: row {i}, column {column!r}: a response is text, got {type(value).__name__} "
                        f"{str(value)[:60]!r}")
    return value


def _ids(value: Any, where: str, i: int, column: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
        raise DataError(f"{where}: row {i}, column {column!r}: token ids are a list of non-negative integers")
    return value


def _group_rows(raw: list[dict], schema: str, data, where: str) -> Iterable[tuple[int, dict, str, list]]:
    """(row number, source row, prompt column, [(response, reward | NaN, ids | None), ...]) per source row."""
    for i, row in enumerate(raw, 1):
        if schema == "flat":
            reward = (_reward(row[data.reward_column], where, i, data.reward_column)
                      if data.reward_column in row else math.nan)
            ids = _ids(row["response_ids"], where, i, "response_ids") if row.get("response_ids") is not None else None
            yield i, row, data.prompt_column, [(_response(_column(row, data.response_column, where, i, role="the response"),
                                                           where, i, data.response_column), reward, ids)]
            continue
        if schema == "groups":
            completions = _column(row, "completions", where, i, role="the completions")
            if not isinstance(completions, list):
                raise DataError(f"{where}: row {i}, column 'completions': a list of responses, got {type(completions).__name__}")
            rewards = row.get("rewards")
            if rewards is not None and (not isinstance(rewards, list) or len(rewards) != len(completions)):
                raise DataError(f"{where}: row {i}, column 'rewards': one reward per completion ({len(completions)}), got "
                                f"{rewards!r}"[:300])
            ids = row.get("completion_ids")
            items = [(_response(c, where, i, "completions"),
                      math.nan if rewards is None else _reward(rewards[j], where, i, f"rewards[{j}]"),
                      None if ids is None else _ids(ids[j], where, i, f"completion_ids[{j}]"))
                     for j, c in enumerate(completions)]
            yield i, row, data.prompt_column, items
            continue
        completions = _column(row, "completions", where, i, role="the completions")  # ultrafeedback
        if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
            raise DataError(f"{where}: row {i}, column 'completions': UltraFeedback's list of {{response, overall_score}}")
        items = []
        for j, c in enumerate(completions):
            score = "overall_score" if "overall_score" in c else "fine-grained_score"
            items.append((_response(c.get("response"), where, i, f"completions[{j}].response"),
                          _reward(c.get(score), where, i, f"completions[{j}].{score}"), None))
        column = data.prompt_column if data.prompt_column in row else "instruction"
        yield i, row, column, items


def load_candidates(data, *, log=_no_log) -> list[dict]:
    """The candidates of ``data.candidates``: one dict per candidate (see the module docstring), prompts
    in file order, ``k`` in their order there. Checked: every prompt has >= 2 responses (the losses
    compare pairs), rewards are finite numbers or absent for the whole file; a repeated prompt row
    (groups, ultrafeedback) is dropped or refused as ``data.duplicates`` says."""
    rows, notes = _cached_candidates(_frozen(data), source_digest(data.candidates))
    for note in notes:
        log(note)
    return [dict(r) for r in rows]


@functools.lru_cache(maxsize=8)
def _cached_candidates(frozen: str, digest: str) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    data, notes = _thawed(frozen), []
    raw, where = read_rows(data.candidates, split=data.hub_split, what="data.candidates")
    schema = _schema(raw, data, where)
    name = task_name(data)
    groups: dict[str, dict] = {}
    repeated = 0
    for i, row, column, items in _group_rows(raw, schema, data, where):
        head = _prompt_row(row, data, where, i, name, column)
        if head["_key"] in groups and schema != "flat":
            if data.duplicates == "error":
                raise DataError(f"{where}: row {i} repeats the prompt of row {groups[head['_key']]['row']}; "
                                "data.duplicates: error refuses repeats (drop keeps the first)")
            repeated += 1
            continue
        group = groups.setdefault(head["_key"], {"row": i, "head": head, "items": []})
        group["items"] += [(i, *item) for item in items]
    if repeated:
        notes.append(f"{where}: {repeated} repeated prompt row(s) dropped (the first of each kept; data.duplicates)")
    rows = [g["head"] for g in groups.values()]
    ids: dict[str, int] = {}
    for g in groups.values():
        if g["head"]["prompt_id"] in ids:
            raise DataError(f"{where}: rows {ids[g['head']['prompt_id']]} and {g['row']} have the same prompt id "
                            f"{g['head']['prompt_id']!r} but different prompts; prompt ids must be unique")
        ids[g["head"]["prompt_id"]] = g["row"]
        if len(g["items"]) < 2:
            raise DataError(f"{where}: row {g['row']}: prompt {g['head']['prompt'][:60]!r} has {len(g['items'])} response(s); "
                            "VCB and the pairwise losses compare responses: at least 2 per prompt")
    scored = {math.isnan(item[2]) for g in groups.values() for item in g["items"]}
    if len(scored) > 1:
        first = next(item[0] for g in groups.values() for item in g["items"] if math.isnan(item[2]))
        raise DataError(f"{where}: row {first} has no reward but others have one; give every candidate a reward, or none "
                        "(then rewards.reward_model scores them)")
    _split(rows, data)
    out = []
    for g in groups.values():
        head = g["head"]
        for k, (_, response, reward, ids_) in enumerate(g["items"]):
            out.append({**head, "k": k, "response": response, "reward": reward, "response_ids": ids_})
    _finish(out, where)
    return tuple(out), tuple(notes)


def _candidate_prompts(data, *, log=_no_log) -> list[dict]:
    seen, out = set(), []
    for r in load_candidates(data, log=log):
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            out.append(r)
    return out


def fingerprint(data) -> str:
    """What the task's data is, for every artefact key: the files' content and the whole ``data`` section."""
    import dataclasses

    parts = dataclasses.asdict(data) | {"prompts_digest": source_digest(data.prompts),
                                        "candidates_digest": source_digest(data.candidates)}
    return "data:" + _hash(json.dumps(parts, sort_keys=True))[:16]
