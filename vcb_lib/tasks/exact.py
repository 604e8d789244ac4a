"""The exact task: a language small enough that every response to a prompt can be enumerated.

Its definition is data, ``vcb_lib/tasks/exact.json`` (so editing it makes every artefact built from
it stale, as for the other embedded tasks): the prompts (templates × items, split by
``vcb_lib.data``) and ``space``:

- **responses**: every string of exactly ``length`` = L tokens over ``vocabulary`` = V (six
  tokens a-f); prompts are three tokens over the same vocabulary. The model's vocabulary is V
  itself (no end-of-sequence, padding or unknown token: ``vcb_lib.models`` builds it), so the model
  can produce nothing else: the |V|^L responses hold all of its probability mass, and sums over them
  are exact expectations. |V|^L is capped at :data:`MAX_RESPONSES` (:func:`check_space`).
- **reward** r(x, y) (:func:`reward_ids`), with x = (x_1, x_2, x_3), y = (y_1, …, y_L)::

      r(x, y) = Σ_t copy_t·[y_t = x_t]          per-position preferences set by the prompt (1.0, 0.6, 0.3)
              + ending[y_L]                     e: 0.9, f: 0.85, other tokens: 0 — a Figure 1-like near-tie
              + repeat·Σ_t [y_t = y_{t+1}]      interaction of adjacent positions (-0.5 per repeat)

  For x = "a c b" the best response is "a c b e" (r = 2.8) and the second best "a c b f" (2.75):
  two near-equal good responses, as y_3 and y_2 of the paper's Figure 1; "a c b a" (1.9) is the
  clearly worse third. Prompts with a repeated token ("a a b") make copying and the repeat penalty
  pull against each other. An empty response has no term: r = 0.
- **target** π_target(y|x), the known distribution the SFT stage fits (:func:`sft_targets` draws
  ``sft_samples`` responses per train prompt from it): a Markov chain, token by token::

      π_target(y_t = v | x, y_<t) ∝ exp(copy·[v = x_t] + follow·[v = next(y_{t-1})] + token[v])

  with next(v) the following token of V (a -> b -> … -> f -> a), y_0 = the prompt's last token, and
  no copy term past the prompt. It likes copying (aligned with the reward), counting up (not
  rewarded) and ending with f, the slightly worse good ending: π_sft puts more mass on "x f" than
  on "x e", the situation of Figure 1 where order-based losses and VCB part ways.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

SPACE_FILE = Path(__file__).resolve().with_name("exact.json")
MAX_RESPONSES = 4096  # |V|^L per prompt the exact metrics enumerate (every policy's log-probs are (prompts, |V|^L))


@dataclass(frozen=True)
class Space:
    """``space`` of exact.json, read once (:func:`space`)."""

    vocabulary: tuple[str, ...]  # V, in token-id order
    length: int  # L, the default response length (params/exact.yaml: sampling.max_new_tokens)
    copy: tuple[float, ...]  # reward for y_t = x_t, by position t
    ending: dict[str, float]  # reward of the last token
    repeat: float  # reward of each adjacent repeat y_t = y_{t+1}
    target_copy: float
    target_follow: float
    target_token: dict[str, float]
    sft_samples: int  # responses drawn from π_target per train prompt: the SFT data
    seed: int  # seed of those draws

    def token_logits(self) -> np.ndarray:
        """(V,) the target's per-token preference."""
        return np.array([self.target_token.get(v, 0.0) for v in self.vocabulary])

    def ending_values(self) -> np.ndarray:
        """(V,) the reward of each token as the last one."""
        return np.array([self.ending.get(v, 0.0) for v in self.vocabulary])


@functools.lru_cache(maxsize=None)
def space() -> Space:
    raw = json.loads(SPACE_FILE.read_text(encoding="utf-8"))["space"]
    r, t = raw["reward"], raw["target"]
    vocab = tuple(raw["vocabulary"])
    if len(set(vocab)) != len(vocab) or any(not v or v.split() != [v] for v in vocab):
        raise ValueError(f"{SPACE_FILE}: the vocabulary must be distinct single words, got {vocab}")
    for name, table in (("reward.ending", r["ending"]), ("target.token", t["token"])):
        unknown = sorted(set(table) - set(vocab))
        if unknown:
            raise ValueError(f"{SPACE_FILE}: {name} names tokens outside the vocabulary: {unknown}")
    return Space(vocab, int(raw["length"]), tuple(map(float, r["copy"])), dict(r["ending"]), float(r["repeat"]),
                 float(t["copy"]), float(t["follow"]), dict(t["token"]), int(t["sft_samples"]), int(t["seed"]))


def check_space(vocab_size: int, length: int, cap: int = MAX_RESPONSES) -> int:
    """|V|^L, the responses per prompt; ``ValueError`` naming the cap and the values when it is over
    the cap (the exact metrics hold every policy's log-probs of every response)."""
    if vocab_size < 2 or length < 1:
        raise ValueError(f"an enumerable response space needs |V| >= 2 and L >= 1, got |V| = {vocab_size}, L = {length}")
    count = vocab_size ** length
    if count > cap:
        raise ValueError(f"the exact tier enumerates |V|^L = {vocab_size}^{length} = {count:_} responses per prompt, "
                         f"over the cap of {cap:_} (vcb_lib.tasks.exact.MAX_RESPONSES): lower L "
                         f"(sampling.max_new_tokens) or the vocabulary")
    return count


def all_responses(vocab_size: int, length: int) -> np.ndarray:
    """(|V|^L, L) int64: every response as token ids, in lexicographic order (``itertools.product``)."""
    check_space(vocab_size, length)
    return np.array(list(itertools.product(range(vocab_size), repeat=length)), dtype=np.int64).reshape(-1, length)


def token_ids(text: str) -> list[int]:
    """Whitespace-separated tokens of V -> ids; ``ValueError`` naming an unknown token and V."""
    index = {v: i for i, v in enumerate(space().vocabulary)}
    out = []
    for word in text.split():
        if word not in index:
            raise ValueError(f"exact task: {word!r} in {text!r} is not a token of the vocabulary {list(index)}")
        out.append(index[word])
    return out


def text(ids: Sequence[int]) -> str:
    """Token ids -> "a c b e" (what the word-level tokenizer decodes to)."""
    return " ".join(space().vocabulary[int(i)] for i in ids)


def reward_terms(prompt: Sequence[int], responses: np.ndarray) -> dict[str, np.ndarray]:
    """The three terms of r(x, y) (module docstring) for one prompt x (ids) and responses (N, L') int:
    ``copy``, ``ending``, ``repeat``, each (N,) float64; r is their sum."""
    s = space()
    y = np.asarray(responses, dtype=np.int64)
    if y.ndim != 2:
        raise ValueError(f"responses must be (N, L), got shape {y.shape}")
    copy, ending, repeat = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y))
    for t, w in enumerate(s.copy[:min(len(prompt), y.shape[1])]):
        copy += w * (y[:, t] == prompt[t])
    if y.shape[1]:
        ending = s.ending_values()[y[:, -1]]
        repeat = s.repeat * (y[:, 1:] == y[:, :-1]).sum(1)
    return {"copy": copy, "ending": ending, "repeat": repeat}


def reward_ids(prompt: Sequence[int], responses: np.ndarray) -> np.ndarray:
    """r(x, y) of the module docstring for one prompt x (ids) and responses (N, L') int -> (N,) float64."""
    terms = reward_terms(prompt, responses)
    return terms["copy"] + terms["ending"] + terms["repeat"]


def reward(prompt: str, response: str) -> float:
    """r(x, y) on text (the gold reward, ``rewards.ExactGold``)."""
    return float(reward_ids(token_ids(prompt), np.array([token_ids(response)], dtype=np.int64).reshape(1, -1))[0])


def _step_logits(s: Space, prompt: Sequence[int], t: int, prev: np.ndarray) -> np.ndarray:
    """(N, V) logits of π_target at position t given each response's previous token ``prev`` (N,)."""
    V = len(s.vocabulary)
    logits = np.tile(s.token_logits(), (len(prev), 1))
    if t < len(prompt):
        logits[:, prompt[t]] += s.target_copy
    logits[np.arange(len(prev)), (prev + 1) % V] += s.target_follow
    return logits


def target_logps(prompt: Sequence[int], responses: np.ndarray) -> np.ndarray:
    """log π_target(y|x) (module docstring) of responses (N, L) int -> (N,) float64."""
    s = space()
    y = np.asarray(responses, dtype=np.int64)
    out, prev = np.zeros(len(y)), np.full(len(y), prompt[-1], dtype=np.int64)
    for t in range(y.shape[1]):
        logits = _step_logits(s, prompt, t, prev)  # (N, V)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        out += logits[np.arange(len(y)), y[:, t]] - logz
        prev = y[:, t]
    return out


def sample_target(prompt: Sequence[int], m: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """(m, L) responses drawn from π_target, token by token."""
    s = space()
    y, prev = np.zeros((m, length), dtype=np.int64), np.full(m, prompt[-1], dtype=np.int64)
    for t in range(length):
        logits = _step_logits(s, prompt, t, prev)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y[:, t] = (p.cumsum(1) > rng.random((m, 1))).argmax(1)
        prev = y[:, t]
    return y


def sft_targets(rows: Sequence[dict], length: int) -> tuple[list[str], list[str], list[str]]:
    """The SFT data: ``sft_samples`` responses of ``length`` tokens per prompt row drawn from
    π_target (seeded by ``seed`` and the prompt text, so a prompt's draws do not depend on the
    others). Returns (prompts, targets, ids), one entry per target, ids ``<prompt_id>/<k>``."""
    s = space()
    prompts, targets, ids = [], [], []
    for row in rows:
        digest = int(hashlib.sha256(f"{s.seed}|{row['prompt']}".encode()).hexdigest()[:16], 16)
        draws = sample_target(token_ids(row["prompt"]), s.sft_samples, length, np.random.default_rng(digest))
        for k, ids_k in enumerate(draws):
            prompts.append(row["prompt"])
            targets.append(text(ids_k))
            ids.append(f"{row['prompt_id']}/{k}")
    return prompts, targets, ids
