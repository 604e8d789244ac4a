"""A white-box proxy reward for explaining science to a child (the kind of reward of "Rethinking the
Role of Proxy Rewards in Language Model Alignment", arXiv 2402.03469): interpretable terms, no model.

The workbench calls ``score(prompts, responses)`` with a batch and takes one float per pair
(``rewards.reward_model`` / ``rewards.evaluation: examples/own_data/reward.py:score``).
"""
import re

LONG_WORD = 10  # letters: a word a ten-year-old may not know


def _words(text):
    return re.findall(r"[a-z']+", text.lower())


def score(prompts, responses):
    out = []
    for prompt, response in zip(prompts, responses):
        words = _words(response)
        n = len(words)
        subject = {w for w in _words(prompt) if len(w) > 3} - {"explain", "describe", "would", "keep", "simple", "child",
                                                              "what", "year"}
        on_topic = 1.0 if subject & set(words) else 0.0  # names what was asked about
        length = 1.0 if 15 <= n <= 60 else max(0.0, 1 - abs(n - 37) / 60)  # two or three sentences
        plain = 1.0 - sum(len(w) >= LONG_WORD for w in words) / max(n, 1) * 5  # few long words
        trigrams = [tuple(words[i:i + 3]) for i in range(max(n - 2, 0))]
        repeats = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
        finished = 1.0 if response.rstrip().endswith((".", "!", "?")) else 0.0
        out.append(on_topic + length + max(plain, 0.0) + 0.5 * finished - 2 * repeats)
    return out
