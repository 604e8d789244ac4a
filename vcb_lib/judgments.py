"""Natural-language judgments of candidate responses: what CUT (Contrastive Unlikelihood Training,
Xu et al., arXiv 2312.14591; :func:`vcb_lib.losses.cut_loss`) learns from instead of reward values.

A judgment is a short critique of one response. The white-box source (:class:`WhiteBoxJudgments`)
writes it from the features of the task's gold reward that failed: for ``assistant`` the white-box
reward's features (relevance, length for the question type, repeated n-grams, stopping mid-sentence,
copying the prompt, list format; after Kim & Seo's reverse-engineered reward), for ``sentiment``
VADER's compound score and per-word polarity. A response with no failed feature gets the task's
positive judgment. The sentences and thresholds are data, ``judgments.yaml`` beside this module
(:func:`load_templates` validates it and names the file, the key and what is allowed on any error),
and every :class:`Judgment` carries the feature values behind it.

Sources share one interface (:class:`JudgmentSource`): ``judge(prompts, responses) -> [Judgment]``,
``positive_text`` (the positive judgment, also CUT's fake positive) and ``fingerprint()`` (what an
artefact key records). :class:`LLMJudgments` is the second source: critiques from any OpenAI-compatible
chat model through :class:`vcb_lib.judge.JudgeClient`. The rewards stay in :mod:`vcb_lib.rewards`; a
source reads their features, never the other way round.

:func:`judged_candidates` adds the judgments to D_t with the two contexts CUT scores each candidate in
(``positive_input``, ``judged_input``); :func:`evidence_mask` and :func:`marked_html` serve the analysis
of which tokens CUT marks.
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import yaml

from vcb_lib.config import ConfigError

__all__ = [
    "TEMPLATES_PATH", "TASK_FIELDS", "OPS", "JudgmentTemplateError", "Judgment", "Rule", "TaskTemplates", "Templates",
    "load_templates", "JudgmentSource", "WhiteBoxJudgments", "LLMJudgments", "judgment_source", "judgments_fingerprint",
    "judged_candidates", "quoted_words", "evidence_mask", "marked_html",
]

TEMPLATES_PATH = Path(__file__).resolve().with_name("judgments.yaml")
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
CONTEXT_FIELDS = ("instruction", "judgment")
OPEN_QUOTE, CLOSE_QUOTE = "\u201c", "\u201d"  # how the sources quote evidence (words, n-grams): “dull”

# The fields each white-box source computes per candidate, with their types: what templates may use.
TASK_FIELDS: dict[str, dict[str, type]] = {
    "sentiment": {"n_words": int, "empty": int, "neg": float, "neu": float, "pos": float, "compound": float,
                  "negative_words": str, "positive_words": str, "n_negative_words": int, "n_positive_words": int},
    "assistant": {"qtype": str, "n_words": int, "empty": int, "relevance": float, "length_penalty": float,
                  "repetition": float, "unfinished": float, "copying": float, "list_format": float, "lo": int, "hi": int,
                  "repeated": str, "n_repeated": int, "ending": str, "copy_share": float, "list_items": int, "is_list": int},
}
MAX_QUOTED = 4  # evidence quoted per sentence (words, n-grams)


class JudgmentTemplateError(ConfigError):  # a ValueError; the command line prints it without a traceback
    """A judgment template file that cannot be used; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Judgment:
    """One response's judgment: its text, whether it is positive, the rules that failed (template
    order; empty when positive), the feature values behind it, and the source that wrote it."""

    text: str
    positive: bool
    failed: tuple[str, ...]
    values: dict[str, Any] = field(compare=False)
    source: str


@dataclass(frozen=True)
class Rule:
    name: str
    when: tuple[tuple[str, str, float | str], ...]  # (field, op, number or field), all must hold
    text: str

    def fires(self, row: dict) -> bool:
        return all(OPS[op](row[f], row[v] if isinstance(v, str) else v) for f, op, v in self.when)


@dataclass(frozen=True)
class TaskTemplates:
    positive: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Templates:
    context: str  # "{instruction} ... {judgment}"
    tasks: dict[str, TaskTemplates]
    path: Path
    digest: str  # sha256 of the file's text (16 hex digits)


# --------------------------------------------------------------------------------------------
# Templates: load and validate
# --------------------------------------------------------------------------------------------


def _placeholders(text: str) -> list[str]:
    return [name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def _dummy(types: dict[str, type]) -> dict[str, Any]:
    return {k: {int: 0, float: 0.0, str: "x"}[t] for k, t in types.items()}


def load_templates(path: str | Path = TEMPLATES_PATH) -> Templates:
    """Read and validate a judgment template file (default: ``judgments.yaml`` beside this module).

    Raises :class:`JudgmentTemplateError` naming the file, the key (``assistant.rules[2].when[0]``) and
    what is allowed: unknown or missing keys, a context without ``{instruction}`` and ``{judgment}``, a
    positive judgment with placeholders, an unknown field or operator, a text that cannot be filled."""
    path = Path(path)

    def fail(where: str, message: str):
        raise JudgmentTemplateError(f"{path}: {where}: {message}")

    def fields(where: str, text: str, allowed: str = "") -> list[str]:
        """The placeholders of format string ``text`` (else fail at ``where``)."""
        try:
            return _placeholders(text)
        except ValueError as err:
            fail(where, f"not a format string ({err})" + allowed)

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JudgmentTemplateError(f"{path}: no such judgment template file") from None
    except IsADirectoryError:
        raise JudgmentTemplateError(f"{path}: a folder, not a judgment template file (UTF-8 YAML text)") from None
    except UnicodeDecodeError as err:  # a binary file, or text in another encoding
        raise JudgmentTemplateError(f"{path}: not a judgment template file: expected UTF-8 YAML text (a mapping with "
                                    f"the keys {', '.join(['context', *TASK_FIELDS])}), but byte {err.start} is not "
                                    f"UTF-8 ({err.reason})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise JudgmentTemplateError(f"{path}: not valid YAML: {err}") from None
    top = ["context", *TASK_FIELDS]
    if not isinstance(raw, dict):
        fail("top level", f"must be a mapping with the keys {', '.join(top)}, got {type(raw).__name__}")
    for key in raw:
        if key not in top:
            fail(str(key), f"unknown key; allowed: {', '.join(top)}")
    for key in top:
        if key not in raw:
            fail(key, f"missing; the file needs {', '.join(top)}")

    context = raw["context"]
    if not isinstance(context, str):
        fail("context", f"must be a string with {{instruction}} and {{judgment}}, got {context!r}")
    names = fields("context", context, "; allowed placeholders: {instruction}, {judgment}")
    for name in names:
        if name not in CONTEXT_FIELDS:
            fail("context", f"unknown placeholder {{{name}}}; allowed: {{instruction}}, {{judgment}}")
    for name in CONTEXT_FIELDS:
        if name not in names:
            fail("context", f"must contain {{{name}}} (the context shows the instruction and the judgment)")

    tasks = {}
    for task, types in TASK_FIELDS.items():
        section = raw[task]
        if not isinstance(section, dict) or set(section) != {"positive", "rules"}:
            got = sorted(section) if isinstance(section, dict) else type(section).__name__
            fail(task, f"must be a mapping with exactly the keys positive, rules; got {got}")
        positive = section["positive"]
        if not isinstance(positive, str) or not positive.strip():
            fail(f"{task}.positive", f"must be a non-empty string, got {positive!r}")
        fields_used = fields(f"{task}.positive", positive)
        if fields_used:
            fail(f"{task}.positive", f"must be plain text without placeholders (it is also CUT's fake positive "
                                     f"judgment of a negative candidate), found {', '.join('{' + f + '}' for f in fields_used)}")
        rules_raw = section["rules"]
        if not isinstance(rules_raw, list) or not rules_raw:
            fail(f"{task}.rules", f"must be a non-empty list of rules (name, when, text), got {rules_raw!r}")
        numeric = [k for k, t in types.items() if t is not str]
        rules, names_seen = [], set()
        for i, rule in enumerate(rules_raw):
            where = f"{task}.rules[{i}]"
            if not isinstance(rule, dict) or set(rule) != {"name", "when", "text"}:
                got = sorted(rule) if isinstance(rule, dict) else type(rule).__name__
                fail(where, f"must be a mapping with exactly the keys name, when, text; got {got}")
            name = rule["name"]
            if not isinstance(name, str) or not name.isidentifier():
                fail(f"{where}.name", f"must be an identifier (letters, digits, _), got {name!r}")
            if name in names_seen:
                fail(f"{where}.name", f"{name!r} is used twice; rule names are unique")
            names_seen.add(name)
            where = f"{task}.rules[{i}] ({name})"
            when = rule["when"]
            if not isinstance(when, list) or not when:
                fail(f"{where}.when", f"must be a non-empty list of [field, op, value], got {when!r}")
            conditions = []
            for j, cond in enumerate(when):
                at = f"{where}.when[{j}]"
                if not isinstance(cond, list) or len(cond) != 3:
                    fail(at, f"must be [field, op, value], got {cond!r}")
                f, op, v = cond
                if f not in numeric:
                    fail(at, f"unknown numeric field {f!r}; allowed: {', '.join(numeric)}")
                if op not in OPS:
                    fail(at, f"unknown operator {op!r}; allowed: {', '.join(OPS)}")
                if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) or v in numeric):
                    fail(at, f"value must be a finite number or a numeric field ({', '.join(numeric)}), got {v!r}")
                conditions.append((f, op, v if isinstance(v, str) else float(v)))
            text_ = rule["text"]
            if not isinstance(text_, str) or not text_.strip():
                fail(f"{where}.text", f"must be a non-empty string, got {text_!r}")
            used = fields(f"{where}.text", text_)
            unknown = [u for u in used if u not in types]
            if unknown:
                fail(f"{where}.text", f"unknown field {{{unknown[0]}}}; allowed: {', '.join(types)}")
            try:
                text_.format(**_dummy(types))
            except (ValueError, TypeError, KeyError, IndexError) as err:
                fail(f"{where}.text", f"cannot be filled ({type(err).__name__}: {err})")
            rules.append(Rule(name, tuple(conditions), text_))
        tasks[task] = TaskTemplates(positive.strip(), tuple(rules))
    return Templates(context, tasks, path, hashlib.sha256(text.encode()).hexdigest()[:16])


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class JudgmentSource(Protocol):
    """Writes one judgment per (prompt, response). ``positive_text``: the judgment of a response with
    nothing wrong, used as CUT's fake positive judgment too; ``fingerprint()``: what an artefact's key
    records (a changed template or judge model makes the runs trained on the old judgments stale)."""

    name: str
    positive_text: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgment]: ...

    def fingerprint(self) -> str: ...


def _quote(items: Sequence[str]) -> str:
    return ", ".join(f"{OPEN_QUOTE}{x}{CLOSE_QUOTE}" for x in items[:MAX_QUOTED]) + (", ..." if len(items) > MAX_QUOTED else "")


WHITEBOX_VERSION = 2  # raised when the code computing the features changes what a judgment says (2: VADER's words in context)


class WhiteBoxJudgments:
    """Judgments written from a task's white-box features (``sentiment``, ``assistant``) by the
    templates (:func:`load_templates`): the sentences of the rules that fire, in template order, or the
    positive judgment. Deterministic: the same responses get the same judgments."""

    def __init__(self, task: str, templates: Templates | None = None):
        if task not in TASK_FIELDS:
            raise ValueError(f"no white-box judgments for task {task!r}; tasks with them: {', '.join(TASK_FIELDS)} "
                             "(another task needs another source, e.g. LLMJudgments)")
        self.task, self.templates = task, templates or load_templates()
        self.spec = self.templates.tasks[task]
        self.name = f"whitebox-{task}"
        self.positive_text = self.spec.positive
        self._gold = None

    def fingerprint(self) -> str:
        return f"{self.name}:v{WHITEBOX_VERSION}:{self.templates.digest}"

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, Any]]:
        """One row of :data:`TASK_FIELDS` values per response (the values a judgment carries)."""
        from vcb_lib import rewards

        if self._gold is None:
            self._gold = rewards.gold_reward(self.task)
        table = self._gold.features(list(prompts), list(responses), show_progress=False)
        rows = []
        for (_, f), prompt, response in zip(table.iterrows(), prompts, responses):
            row: dict[str, Any] = {"n_words": int(f["n_words"]), "empty": int(not response.strip())}
            if self.task == "sentiment":
                valences = self._gold.word_valences(response)
                neg = list(dict.fromkeys(w for w, v in valences if v < 0))  # each word once, first spelling
                pos = list(dict.fromkeys(w for w, v in valences if v > 0))
                value = {w.lower(): v for w, v in valences}
                row |= {k: float(f[k]) for k in ("neg", "neu", "pos", "compound")}
                row |= {"negative_words": ", ".join(f"{_quote([w])} ({value[w.lower()]:+.1f})" for w in neg[:MAX_QUOTED])
                        + (", ..." if len(neg) > MAX_QUOTED else ""),
                        "positive_words": _quote(pos), "n_negative_words": len(neg), "n_positive_words": len(pos)}
            else:
                qtype = str(f["qtype"])
                lo, hi = self._gold.length_targets[qtype]
                repeated = rewards.repeated_ngrams(response)
                row |= {k: float(f[k]) for k in ("relevance", "length_penalty", "repetition", "unfinished", "copying",
                                                 "list_format")}
                row |= {"qtype": qtype, "lo": int(lo), "hi": int(hi), "repeated": _quote(repeated), "n_repeated": len(repeated),
                        "ending": _quote([" ".join(response.split()[-4:])]), "copy_share": rewards.copy_fraction(prompt, response),
                        "list_items": rewards.count_list_items(response), "is_list": int(qtype == "list")}
            rows.append(row)
        return rows

    def judgment(self, row: dict[str, Any]) -> Judgment:
        """The judgment of one feature row."""
        fired = [rule for rule in self.spec.rules if rule.fires(row)]
        if not fired:
            return Judgment(self.positive_text, True, (), dict(row), self.name)
        return Judgment(" ".join(rule.text.format(**row) for rule in fired), False, tuple(r.name for r in fired),
                        dict(row), self.name)

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgment]:
        return [self.judgment(row) for row in self.features(prompts, responses)]


LLM_JUDGMENT_PROMPT = (
    "You critique a response to an instruction. In one to three sentences, say what is wrong with the response, "
    "quoting the words at fault between \u201c and \u201d. Then end with a line 'Verdict: good' if nothing is wrong, "
    "or 'Verdict: bad' otherwise.\n\nInstruction: {instruction}\nResponse: {response}"
)
LLM_POSITIVE = "The response is good: nothing in it is wrong."
LLM_REPLY_REGEX = r"[^\n]{1,300}\nVerdict: (good|bad)"  # a local vLLM judge is held to it (a small model drifts otherwise); 300 characters fit max_tokens
_VERDICT = re.compile(r"verdict\s*:\s*\**\s*(good|bad)\b", re.IGNORECASE)


def _llm_digest(prompt: str, positive_text: str) -> str:
    return hashlib.sha256((prompt + "|" + positive_text).encode()).hexdigest()[:16]


class LLMJudgments:
    """Critiques from an OpenAI-compatible chat model (``judge.JudgeClient``: a vLLM server, GPT-4, ...),
    the paper's setting of judgments written by a model. Each reply's last ``Verdict: good|bad`` line
    decides the judgment's sign; the rest of the reply is a negative judgment's text. A positive judgment
    is ``positive_text`` (so that CUT's fake positive and its real positives read alike), its values
    holding the model's critique. A reply without a verdict raises ``judge.JudgeReplyError``."""

    def __init__(self, client, *, positive_text: str = LLM_POSITIVE, prompt: str = LLM_JUDGMENT_PROMPT,
                 max_workers: int = 1):
        if set(_placeholders(prompt)) != {"instruction", "response"}:
            raise ValueError(f"LLMJudgments prompt must contain exactly {{instruction}} and {{response}}, got {prompt!r}")
        self.client, self.prompt, self.positive_text, self.max_workers = client, prompt, positive_text, max_workers
        self.name = f"llm-{client.model}"

    def fingerprint(self) -> str:
        return f"{self.name}:{_llm_digest(self.prompt, self.positive_text)}"

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgment]:
        """One judgment per pair, in order; ``max_workers`` requests in flight at once (a vLLM server
        batches them)."""
        from concurrent.futures import ThreadPoolExecutor

        texts = [self.prompt.format(instruction=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            replies = list(pool.map(self.client.complete, texts))
        return [self._judgment(i, reply) for i, reply in enumerate(replies)]

    def _judgment(self, i: int, reply: str) -> Judgment:
        from vcb_lib.judge import JudgeReplyError

        verdicts = _VERDICT.findall(reply)
        if not verdicts:
            raise JudgeReplyError(f"judgment {i}: the reply has no 'Verdict: good|bad' line: {reply[:300]!r}")
        critique = _VERDICT.sub("", reply).strip()
        values = {"verdict": verdicts[-1].lower(), "critique": critique}
        if values["verdict"] == "good":
            return Judgment(self.positive_text, True, (), values, self.name)
        return Judgment(critique or "The response is bad.", False, ("llm",), values, self.name)


def judgment_source(task: str) -> WhiteBoxJudgments:
    """The default source of a task's judgments: its white-box features (``ValueError`` naming the tasks
    that have them otherwise)."""
    return WhiteBoxJudgments(task)


def judgments_fingerprint(task: str, *, llm: bool = False) -> str:
    """What the source of ``task``'s judgments records in an artefact key, without computing a judgment:
    with ``llm``, :class:`LLMJudgments`' prompt and positive text (its model and endpoint are config
    keys of their own); else the white-box templates (a task without them says so: training CUT on it
    fails with the reason)."""
    if llm:
        return f"llm:{_llm_digest(LLM_JUDGMENT_PROMPT, LLM_POSITIVE)}"
    if task not in TASK_FIELDS:
        return f"{task}:no-white-box-judgments"
    return f"whitebox-{task}:v{WHITEBOX_VERSION}:{load_templates().digest}"


# --------------------------------------------------------------------------------------------
# A judged D_t: the judgments and the contexts CUT scores each candidate in
# --------------------------------------------------------------------------------------------


def judged_candidates(table, source: JudgmentSource, tokenizer, *, positive: str = "none",
                      templates: Templates | None = None):
    """D_t (pandas, ``prompt``, ``response``, ``model_input``, ...) with each candidate's judgment and CUT's contexts.

    Adds ``judgment`` (text), ``judgment_positive`` (bool), ``judgment_failed`` (the failed rules),
    ``judgment_values`` (JSON of the feature values behind it), ``judgment_source``, and the model inputs:

    * ``positive_input``: the positive context x⁺ of Align-P and Misalign. ``positive="none"`` (the
      paper's released code): D_t's own ``model_input``, the instruction alone, which is the template
      every policy is evaluated with (the paper's inference template); ``"judgment"``: the instruction
      with the source's positive judgment in the templates' ``context``.
    * ``judged_input``: the instruction with the candidate's own judgment (its Align-N context when the
      judgment is negative), in the same ``context``.
    Both go through the tokenizer's chat template like ``model_input`` (``models.format_prompt``)."""
    from vcb_lib.models import format_prompt

    if positive not in ("none", "judgment"):
        raise ValueError(f"unknown positive context {positive!r}; allowed: 'none', 'judgment'")
    judgments = source.judge(list(table["prompt"]), list(table["response"]))
    context = (templates or load_templates()).context
    out = table.copy()
    out["judgment"] = [j.text for j in judgments]
    out["judgment_positive"] = [j.positive for j in judgments]
    out["judgment_failed"] = [list(j.failed) for j in judgments]
    out["judgment_values"] = [json.dumps(j.values, sort_keys=True) for j in judgments]
    out["judgment_source"] = [j.source for j in judgments]
    out["judged_input"] = [format_prompt(tokenizer, context.format(instruction=p, judgment=j.text))
                           for p, j in zip(table["prompt"], judgments)]
    if positive == "none":
        out["positive_input"] = out["model_input"]
    else:
        out["positive_input"] = [format_prompt(tokenizer, context.format(instruction=p, judgment=source.positive_text))
                                 for p in table["prompt"]]
    return out


# --------------------------------------------------------------------------------------------
# Evidence and highlighting (notebook 05's look at the tokens CUT marks)
# --------------------------------------------------------------------------------------------

_QUOTED = re.compile(f"{OPEN_QUOTE}([^{CLOSE_QUOTE}]*){CLOSE_QUOTE}")
_WORDISH = re.compile(r"[a-z0-9]+")


def quoted_words(judgment: str) -> set[str]:
    """The lower-cased words inside a judgment's “quotes”: the evidence it names (negative words,
    repeated n-grams, the last words of an unfinished answer)."""
    return {w for span in _QUOTED.findall(judgment) for w in _WORDISH.findall(span.lower())}


def evidence_mask(tokens: Sequence[str], judgment: str) -> list[bool]:
    """Per token (decoded text): True when one of its words is evidence the judgment quotes."""
    words = quoted_words(judgment)
    return [bool(words) and any(w in words for w in _WORDISH.findall(t.lower())) for t in tokens]


def marked_html(tokens: Sequence[str], marked: Sequence[bool], evidence: Sequence[bool]) -> str:
    """One response as HTML: the tokens CUT's rule marked in ``<mark>``, the tokens its judgment quotes
    underlined."""
    import html

    out = []
    for t, m, e in zip(tokens, marked, evidence, strict=True):
        piece = html.escape(t).replace("\n", "<br>")
        if e:
            piece = f"<u>{piece}</u>"
        if m:
            piece = f"<mark>{piece}</mark>"
        out.append(piece)
    return "".join(out)
