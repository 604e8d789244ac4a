"""Rewards of the researcher's choosing: one spec string -> a ``rewards.RewardModel``.

``rewards.reward_model`` (what scores D_t) and ``rewards.evaluation`` (the evaluation reward) take
the same specs besides the built-in ``gold`` / ``learned``:

- ``package.module:function`` or ``path/to/file.py:function`` -> :class:`CallableReward`: the
  function takes a batch, ``fn(prompts: list[str], responses: list[str])``, and returns one float per
  pair (the white-box proxy rewards of "Rethinking the Role of Proxy Rewards", arXiv 2402.03469, are
  exactly this). Its source file's content enters the artefact keys.
- ``judge:local`` or ``judge:<http(s) URL>`` -> :class:`JudgeReward`: an LLM behind an
  OpenAI-compatible endpoint (``judge.open_judge``: a URL, or vLLM's server on 127.0.0.1 serving
  ``rewards.judge_model``) scores each response with a rubric (``rewards.judge_rubric``); the reply's
  last ``Score: N`` is the reward. The rubric and the model enter the keys, never the URL.
- anything else: a folder or hub id of an ``AutoModelForSequenceClassification`` (a trained reward
  model, read with its own tokenizer and chat template: ``rewards.LearnedRewardModel``); the
  folder's files enter the keys.

Every failure is a ``RewardSourceError`` that names the spec, the row and what was expected.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vcb_lib.config import ConfigError, resolve_path

BUILTIN = ("gold", "learned")
CALLABLE = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|[^:]+\.py):(?P<function>[A-Za-z_]\w*)$")
DEFAULT_RUBRIC = (
    "You are grading an AI assistant's response to a user's prompt.\n\nPrompt: {prompt}\n\nResponse: {response}\n\n"
    "Rate how helpful, honest and harmless the response is on a scale of 0 (useless or harmful) to 10 (excellent). "
    "Answer with one short sentence of reasoning, then a last line 'Score: N'."
)
SCORE = re.compile(r"Score:\s*(-?\d+(?:\.\d+)?)")
SCORE_REGEX = r"[^\n]{0,300}\nScore: (10|[0-9])"  # what a local judge's replies are constrained to
BATCH = 256  # pairs per call of a callable reward


class RewardSourceError(ConfigError):
    """A reward spec that cannot be loaded, or a reward that returned something other than one finite float per pair."""


def kind(spec: str) -> str:
    """``gold``, ``learned``, ``callable``, ``judge`` or ``model`` (a sequence-classifier folder / hub id)."""
    if spec in BUILTIN:
        return spec
    if spec.startswith("judge:"):
        return "judge"
    return "callable" if CALLABLE.match(spec) and not resolve_path(spec).is_dir() else "model"


# --------------------------------------------------------------------------------------------
# A Python callable
# --------------------------------------------------------------------------------------------


def _on_path() -> None:
    """A package module of the project (``tests.fixtures...``, ``examples...``) imports from any working
    directory (notebook kernels run in ``notebooks/``): the project root goes last on ``sys.path``."""
    from vcb_lib.config import PROJECT_ROOT

    if str(PROJECT_ROOT) not in sys.path:
        sys.path.append(str(PROJECT_ROOT))


def _function(spec: str) -> tuple[Callable, Path | None]:
    _on_path()
    m = CALLABLE.match(spec)
    module, name = m["module"], m["function"]
    if module.endswith(".py"):
        path = resolve_path(module)
        if not path.is_file():
            raise RewardSourceError(f"reward {spec!r}: file {path} not found (paths are relative to the project root)")
        mod_name = f"vcb_user_reward_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        try:
            loader = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = mod
            loader.loader.exec_module(mod)
        except Exception:
            raise RewardSourceError(f"reward {spec!r}: importing {path} raised:\n{_traceback()}") from None
    else:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise RewardSourceError(f"reward {spec!r}: no module {err.name!r} (a package.module:function on the Python "
                                    "path, or path/to/file.py:function)") from None
        except Exception:
            raise RewardSourceError(f"reward {spec!r}: importing {module} raised:\n{_traceback()}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        found = [n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")]
        raise RewardSourceError(f"reward {spec!r}: {mod.__name__} has no function {name!r}; it has: {sorted(found)[:20]}")
    try:
        source = Path(inspect.getsourcefile(fn) or "")
    except TypeError:
        source = None
    return fn, source if source and source.is_file() else None


def _traceback() -> str:
    """The current exception's traceback, without this module's frames."""
    frames = [f for f in traceback.extract_tb(sys.exc_info()[2]) if Path(f.filename).name != Path(__file__).name
              and "importlib" not in f.filename]
    kind_, value = sys.exc_info()[:2]
    return "".join(traceback.format_list(frames) + traceback.format_exception_only(kind_, value)).rstrip()


class CallableReward:
    """``fn(prompts, responses) -> floats``, called in batches of :data:`BATCH`, checked per pair."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn, self.source = _function(spec)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, show_progress: bool | None = None) -> np.ndarray:
        from tqdm.auto import tqdm

        from vcb_lib.rewards import check_inputs

        prompts, responses = check_inputs(prompts, responses)
        out = np.zeros(len(responses))
        starts = range(0, len(responses), BATCH)
        for start in tqdm(starts, desc=f"reward {self.spec}", disable=show_progress is False or len(starts) < 2):
            p, r = prompts[start:start + BATCH], responses[start:start + BATCH]
            try:
                values = self.fn(list(p), list(r))
            except Exception:
                shown = _traceback()
                row = self._failing_row(p, r)
                where = f"row {start + row} (prompt {p[row][:60]!r}, response {r[row][:60]!r})" if row is not None \
                    else f"rows {start}..{start + len(r) - 1}"
                raise RewardSourceError(f"reward {self.spec!r} raised on {where}:\n{shown}") from None
            out[start:start + len(r)] = self._check(values, len(r), start)
        return out

    def _failing_row(self, prompts: list[str], responses: list[str]) -> int | None:
        """The first pair the function raises on when called alone (None: only the batch fails)."""
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                self.fn([p], [r])
            except Exception:
                return i
        return None

    def _check(self, values, n: int, start: int) -> np.ndarray:
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardSourceError(f"reward {self.spec!r} returned {type(values).__name__} {str(values)[:60]!r} for rows "
                                    f"{start}..{start + n - 1}; expected a list of {n} floats, one per (prompt, response)")
        values = list(values.tolist() if hasattr(values, "tolist") else values)
        if len(values) != n:
            raise RewardSourceError(f"reward {self.spec!r} returned {len(values)} value(s) for {n} (prompt, response) "
                                    f"pairs (rows {start}..{start + n - 1}); expected one float per pair")
        out = np.zeros(n)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise RewardSourceError(f"reward {self.spec!r} returned {type(v).__name__} {str(v)[:60]!r} for row "
                                        f"{start + i}; expected a float")
            if not math.isfinite(float(v)):
                raise RewardSourceError(f"reward {self.spec!r} returned {v} for row {start + i}; rewards must be finite")
            out[i] = float(v)
        return out


# --------------------------------------------------------------------------------------------
# An LLM judge with a rubric
# --------------------------------------------------------------------------------------------


def rubric_text(rubric: str) -> str:
    """``rewards.judge_rubric``: a file's text, the text itself, or the default; it must hold {prompt} and {response}."""
    text = DEFAULT_RUBRIC
    if rubric:
        path = resolve_path(rubric)
        try:
            text = path.read_text(encoding="utf-8") if len(rubric) < 4096 and path.is_file() else rubric
        except UnicodeDecodeError:
            raise RewardSourceError(f"rewards.judge_rubric: {path} is not UTF-8 text") from None
    missing = [f for f in ("{prompt}", "{response}") if f not in text]
    if missing:
        raise RewardSourceError(f"rewards.judge_rubric must contain {{prompt}} and {{response}}; it lacks {missing}")
    return text


def parse_score(reply: str) -> float | None:
    found = SCORE.findall(reply or "")
    return float(found[-1]) if found else None


class JudgeReward:
    """Each (prompt, response) sent with the rubric to an OpenAI-compatible endpoint; the reply's last
    ``Score: N`` is the reward. A reply without one is asked once more, then an error names the row."""

    def __init__(self, spec: str, model: str, rubric: str = "", *, cache_dir=None, log_dir=None, workers: int = 4):
        self.spec, self.model, self.rubric = spec, model, rubric_text(rubric)
        self.endpoint = spec[len("judge:"):]
        self.cache_dir, self.workers = cache_dir, workers
        self.log_path = Path(log_dir or resolve_path("outputs")) / "judge-reward-server.log"

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, show_progress: bool | None = None) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        from vcb_lib.judge import open_judge
        from vcb_lib.rewards import check_inputs

        prompts, responses = check_inputs(prompts, responses)
        with open_judge(self.endpoint, self.model, reply_regex=SCORE_REGEX, log_path=self.log_path,
                        cache_dir=self.cache_dir, log=lambda m: None) as (client, _):
            def one(i: int) -> float:
                text = self.rubric.replace("{prompt}", prompts[i]).replace("{response}", responses[i])
                reply = ""
                for _ in range(2):
                    reply = client.complete(text)
                    value = parse_score(reply)
                    if value is not None and math.isfinite(value):
                        return value
                raise RewardSourceError(f"reward {self.spec!r}: the judge's reply for row {i} has no 'Score: N' line "
                                        f"(twice): {reply[:200]!r}")

            with ThreadPoolExecutor(self.workers) as pool:
                values = list(tqdm(pool.map(one, range(len(prompts))), total=len(prompts), desc="judge reward",
                                   disable=show_progress is False))
        return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# A sequence-classification reward model
# --------------------------------------------------------------------------------------------


def check_classifier(spec: str) -> None:
    """A local folder must hold a ``*ForSequenceClassification`` config with one label (a hub id is checked on load)."""
    folder = resolve_path(spec)
    if not folder.exists():
        if spec.startswith((".", "/", "~")) or "/" not in spec or len(spec.split("/")) > 2:
            raise RewardSourceError(f"reward {spec!r}: no such folder ({folder}), and not a callable "
                                    "(package.module:function, path/to/file.py:function), judge:local|<URL>, gold or learned")
        return  # a hub id: from_pretrained says what is wrong
    config = folder / "config.json"
    if not config.is_file():
        raise RewardSourceError(f"reward {spec!r}: {folder} has no config.json; expected a saved "
                                "AutoModelForSequenceClassification (save_pretrained) folder")
    raw = json.loads(config.read_text(encoding="utf-8"))
    archs = raw.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise RewardSourceError(f"reward {spec!r}: {folder} is not a sequence classifier (architectures: {archs}); "
                                "expected an AutoModelForSequenceClassification with one label (a trained reward model)")
    labels = raw.get("num_labels", len(raw.get("id2label") or {}) or 1)
    if labels != 1:
        raise RewardSourceError(f"reward {spec!r}: {folder} has {labels} labels; a reward model has one (a scalar score)")


def check(spec: str, *, rubric: str = "") -> None:
    """What can be checked of a spec before any stage runs: the callable imports, the folder is a
    sequence classifier, the rubric has its fields (``RewardSourceError`` otherwise)."""
    k = kind(spec)
    if k == "callable":
        _function(spec)
    elif k == "model":
        check_classifier(spec)
    elif k == "judge":
        rubric_text(rubric)


def load(spec: str, *, model: str = "", rubric: str = "", cache_dir=None, log_dir=None):
    """The reward a spec names (not ``gold`` / ``learned``: the stages resolve those)."""
    k = kind(spec)
    if k == "callable":
        return CallableReward(spec)
    if k == "judge":
        return JudgeReward(spec, model, rubric, cache_dir=cache_dir, log_dir=log_dir)
    if k != "model":
        raise ValueError(f"reward_sources.load: {spec!r} is resolved by the stages")
    from vcb_lib.rewards import LearnedRewardModel

    check_classifier(spec)
    return LearnedRewardModel.load(str(resolve_path(spec)) if resolve_path(spec).exists() else spec)


def fingerprint(spec: str, *, model: str = "", rubric: str = "") -> str:
    """What a reward spec computes, for the artefact keys: a callable's source file, a folder's files,
    a judge's model and rubric; ``""`` for the built-in ``gold`` / ``learned`` (their keys say the rest)."""
    k = kind(spec)
    if k in BUILTIN or not spec:
        return ""
    if k == "judge":
        return "judge:" + hashlib.sha256(json.dumps([model, rubric_text(rubric)]).encode()).hexdigest()[:16]
    if k == "callable":
        source = _source_file(spec)
        return f"callable:{_file_digest(str(source)) if source else spec}"
    folder = resolve_path(spec)
    return f"model:{_file_digest(str(folder))}" if folder.exists() else f"hub:{spec}"


def _source_file(spec: str) -> Path | None:
    """A callable's source file, found without running it (a package module: where importlib finds it)."""
    module = CALLABLE.match(spec)["module"]
    if module.endswith(".py"):
        return resolve_path(module)
    _on_path()
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise RewardSourceError(f"reward {spec!r}: no module {module!r} on the Python path (a package.module:function, "
                                "or path/to/file.py:function)")
    return Path(found.origin)


def _file_digest(path: str) -> str:
    from vcb_lib.user_data import source_digest

    return source_digest(path)
