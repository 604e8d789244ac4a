"""Summed response log-probs log π(y|x) of a causal LM: encoding, batching, the forward kernels.

Encoding. ``encode_pairs`` encodes prompt and response separately and concatenates the ids, so the
prompt/response boundary is exact (a prompt or response may already be token ids; an empty prompt
becomes [BOS]). SmolLM2's pad token equals its eos token, so masks come from lengths, never from
comparing ids with the pad id.

Batches, two layouts, both read by ``batch_logps``:

- flat (``collate_pairs``, ``tokenize_pairs`` = encode + collate): ``input_ids``,
  ``attention_mask``, ``response_mask`` (B, T), right-padded, 1 on response tokens; ``n_tokens`` (B,);
- shared prompts (``collate_shared_prompts``): P distinct prompts ``prompt_ids``/``prompt_mask``
  (P, Tp) left-padded, R responses ``completion_ids``/``completion_mask`` (R, Tc) right-padded,
  ``prompt_index`` (R,) naming each response's prompt; each prompt goes through the model once
  (its KV cache copied to the R rows), for P·Tp + R·Tc instead of R·(Tp + Tc) token positions.
  Needs ``can_share_prompts(model)`` (full attention in every layer).

Kernels. ``token_logps`` (B, K, V), (B, K) -> (B, K); ``logps_from_logits`` (B, K, V) logits,
(B, T) ids and mask -> (B,). ``batch_logps(model, batch)`` returns the summed response log-probs
(B,) or (R,) with grad (training), ``batch_token_logps`` the same per token (R, Tc), left-aligned on
each response (token-level losses: CUT); ``sequence_logps(model, tokenizer, prompts, responses)`` -> (N,)
float32 on CPU loops length-sorted batches under ``torch.no_grad()`` (reference log-probs,
scoring), ``sequence_token_logps`` returns each pair's token log-probs. ``prompt_cache`` gives the
samplers the shared prompts' KV cache.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch


def encode_pairs(
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    responses: Sequence[str | Sequence[int]],
    *,
    max_length: int | None = None,
    add_eos: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """Token ids (prompt_ids, response_ids) per pair, prompt and response encoded separately.

    A prompt or response may already be a list of token ids (e.g. what the sampler generated).
    Text prompts get the tokenizer's BOS only if it adds one by default and the text does not
    already start with it; an empty prompt becomes [BOS] (the first response token needs context).
    Responses get no special tokens; ``add_eos`` appends EOS unless the response already ends with it.
    Beyond ``max_length`` the prompt loses its start first (keeping >= 1 token), then the response
    loses its end; check the returned lengths (``n_tokens``) if that matters.
    """
    prompts, responses = _check_pairs(prompts, responses)
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt + one response token), got {max_length}")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos token")

    pairs = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p = _ids(tokenizer, prompt)
        r = _ids(tokenizer, response)
        if isinstance(prompt, str) and adds_bos and p[:1] != [bos]:
            p = [bos] + p
        if not p:
            if bos is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS to stand in for it")
            p = [bos]
        if add_eos and r[-1:] != [eos]:
            r = r + [eos]
        if max_length is not None and len(p) + len(r) > max_length:
            p = p[-max(1, max_length - len(r)):]  # keep the end of the prompt
            r = r[: max_length - len(p)]
        pairs.append((p, r))
    return pairs


def _ids(tokenizer, text_or_ids) -> list[int]:
    if isinstance(text_or_ids, str):
        return list(tokenizer(text_or_ids, add_special_tokens=False).input_ids)
    return [int(t) for t in text_or_ids]


def _check_pairs(prompts, responses) -> tuple[list, list]:
    """Lists (a pandas Series or numpy array is fine), equal lengths, at least one pair."""
    for name, seq in (("prompts", prompts), ("responses", responses)):
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__") or not hasattr(seq, "__iter__"):
            raise TypeError(f"{name} must be a list (one entry per pair), got {type(seq).__name__}")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
    if len(prompts) == 0:
        raise ValueError("no (prompt, response) pairs: prompts and responses are empty")
    return prompts, responses


def collate_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad concatenated prompt+response ids into a batch.

    Returns input_ids (B, T), attention_mask (B, T), response_mask (B, T) (1 on response tokens),
    n_tokens (B,). ``pad_id`` only fills the padding; masks come from lengths, so pad == eos is fine.
    """
    T = max(len(p) + len(r) for p, r in pairs)
    B = len(pairs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.long)
    for b, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        input_ids[b, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[b, :n] = 1
        response_mask[b, len(p):n] = 1
    n_tokens = response_mask.sum(-1)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask, "n_tokens": n_tokens}


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    responses: Sequence[str | Sequence[int]],
    max_length: int | None = None,
    *,
    add_eos: bool = False,
) -> dict[str, torch.Tensor]:
    """encode_pairs + collate_pairs: a right-padded batch, ready for ``batch_logps``."""
    pairs = encode_pairs(tokenizer, prompts, responses, max_length=max_length, add_eos=add_eos)
    return collate_pairs(pairs, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def collate_shared_prompts(prompts: Sequence[list[int]], responses: Sequence[list[int]],
                           prompt_index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """P distinct prompts and R responses, response r continuing prompt ``prompt_index[r]``, as a
    batch for ``batch_logps``'s shared-prompt path (each prompt goes through the model once).

    Returns prompt_ids, prompt_mask (P, Tp) left-padded (all prompts end at the last column),
    completion_ids, completion_mask (R, Tc) right-padded (Tc >= 1), prompt_index (R,),
    n_tokens (R,) = response lengths. Prompts must not be empty (the first response token needs
    context; ``encode_pairs`` guarantees it).
    """
    if not prompts or not responses or len(prompt_index) != len(responses):
        raise ValueError(f"need >= 1 prompt and one prompt_index per response; got {len(prompts)} prompts, "
                         f"{len(responses)} responses, {len(prompt_index)} prompt_index entries")
    if min(map(len, prompts)) == 0:
        raise ValueError("collate_shared_prompts: a prompt is empty; encode it with encode_pairs (adds BOS)")
    P, Tp = len(prompts), max(map(len, prompts))
    R, Tc = len(responses), max(1, max(map(len, responses)))
    prompt_ids = torch.full((P, Tp), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((P, Tp), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, Tp - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, Tp - len(p):] = 1
    completion_ids = torch.full((R, Tc), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((R, Tc), dtype=torch.long)
    for r, ids in enumerate(responses):
        completion_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[r, :len(ids)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "prompt_index": torch.tensor(list(prompt_index), dtype=torch.long),
            "n_tokens": completion_mask.sum(-1)}


def sequence_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Prompt + response tokens of every row of a ``collate_pairs`` or ``collate_shared_prompts``
    batch (a shared prompt counts once per row that continues it), padding excluded."""
    if "prompt_index" in batch:
        return int(batch["prompt_mask"].sum(-1)[batch["prompt_index"]].sum() + batch["completion_mask"].sum())
    return int(batch["attention_mask"].sum())


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: (B, K, V), (B, K) -> (B, K) in float32 (float64
    for a float64 model), computed as x[y] - logsumexp(x) without materialising the (B, K, V)
    log-softmax."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def logps_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token_t | tokens_<t) over response positions.

    logits (B, K, V) of the last K positions (K = T: all of them; K >= 2), input_ids (B, T),
    response_mask (B, T) -> (B,) float32. Response tokens must lie in the last K - 1 positions.
    """
    K = logits.shape[1]
    targets = input_ids[:, -(K - 1):]  # (B, K-1): position t predicts token t+1
    lp = token_logps(logits[:, :-1], targets)  # (B, K-1)
    return (lp * response_mask[:, -(K - 1):].to(lp.dtype)).sum(-1)  # (B,)


def batch_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs (B,) for a ``tokenize_pairs`` / ``collate_pairs`` batch, or (R,)
    for a ``collate_shared_prompts`` batch, keeping the graph (training).

    Only the positions from the batch's first response token on go through the LM head
    (``logits_to_keep``): the (B, T, V) logits of the prompts are never built."""
    if "prompt_index" in batch:
        lp, mask = _shared_prompt_token_logps(model, batch)  # (R, Tc), (R, Tc)
        return (lp * mask.to(lp.dtype)).sum(-1)  # (R,)
    return logps_from_logits(*_flat_logits(model, batch))  # (B, keep, V) -> (B,)


def batch_token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token response log-probs of either batch layout, keeping the graph (token-level losses).

    Returns (R, Tc), left-aligned on each row's response: ``[r, t] = log p(y_t | prompt, y_<t)`` of
    response r's token t for t < ``n_tokens[r]``, 0 beyond it; Tc = the longest response (>= 1). The
    same forward as :func:`batch_logps`, whose values are these rows' sums."""
    if "prompt_index" in batch:
        lp, mask = _shared_prompt_token_logps(model, batch)  # already (R, Tc), left-aligned
        return lp.masked_fill(mask == 0, 0.0)
    logits, input_ids, response_mask = _flat_logits(model, batch)
    K = logits.shape[1]
    lp = token_logps(logits[:, :-1], input_ids[:, -(K - 1):])  # (B, K-1): position t predicts token t+1
    m = response_mask[:, -(K - 1):].bool()  # (B, K-1)
    width = max(1, int(m.sum(-1).max()))
    order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices[:, :width]  # response columns first, in order
    return torch.gather(lp, 1, order).masked_fill(~torch.gather(m, 1, order), 0.0)  # (B, Tc)


def _flat_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of a flat batch: (logits of its last K positions (B, K, V), input_ids (B, T),
    response_mask (B, T)), K = from the position before the batch's first response token on."""
    device = next(model.parameters()).device
    input_ids, response_mask = batch["input_ids"].to(device), batch["response_mask"].to(device)
    T = input_ids.shape[1]
    has_response = response_mask.any(0)  # (T,)
    first = int(has_response.float().argmax()) if bool(has_response.any()) else T - 1
    keep = T - max(first, 1) + 1  # positions first-1 .. T-1 (first-1 predicts the first response token)
    out = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False,
                logits_to_keep=keep)
    return out.logits, input_ids, response_mask


def _left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """(P, Tp) positions of left-padded rows: 0 at each row's first real token (pads clamp to 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: torch.Tensor):
    """Run P left-padded prompts (P, Tp) through ``model`` once and copy their KV cache to R rows:
    row r continues prompt ``rows[r]`` (``Cache.reorder_cache`` = ``index_select``, which the
    gradient flows back through). Returns (logits of each prompt's last position (P, 1, V), the
    cache of R rows). Continue with ``attention_mask = cat([prompt_mask[rows], new_mask], 1)`` and
    positions from ``prompt_mask.sum(-1)[rows]`` on (``generate`` derives both itself)."""
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_left_padded_positions(prompt_mask),
                use_cache=True, logits_to_keep=1)
    out.past_key_values.reorder_cache(rows)  # (P, H, Tp, D) -> (R, H, Tp, D) per layer
    return out.logits, out.past_key_values


def can_share_prompts(model) -> bool:
    """Whether ``batch_logps`` may run a shared-prompt batch on ``model``: a transformers model whose
    decoder layers all attend to the full context (Llama, GPT-NeoX, SmolLM2, ...; sliding-window
    layers keep a cache of their own kind, which ``PromptLayer`` does not reproduce)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model
    if config is None or not hasattr(config, "get_text_config"):
        return False
    types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return all(t == "full_attention" for t in types)


@functools.cache  # one class, defined on first use (transformers is imported lazily here)
def _prompt_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PromptLayer(DynamicLayer):
        """One layer of the shared prompts' KV cache, which never grows, so that a layer recomputed by
        gradient checkpointing reads and returns exactly what its forward did: in the prompt pass
        ``update`` stores the prompt's keys and values (a recompute stores equal ones again); built
        with ``prefix`` (the response pass, the prompts already copied to the R rows) it returns
        prefix ⊕ new along the sequence and stores nothing."""

        def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
            super().__init__()
            self.frozen = prefix is not None
            if prefix is not None:
                self.lazy_initialization(*prefix)
                self.keys, self.values = prefix

        def update(self, key_states, value_states, *args, **kwargs):
            if self.frozen:
                return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    return PromptLayer


@contextlib.contextmanager
def _checkpointed_layers_keep_cache(model):
    """transformers drops the cache inside gradient-checkpointed layers, since a layer that appends
    to it would append again when backward recomputes it (``_can_checkpoint_with_cache``); the
    ``PromptLayer`` cache never appends, so those layers may keep it. Checkpointing must be
    non-reentrant (the Trainer's): the prompt's keys and values leave the checkpointed layer through
    the cache, which only non-reentrant checkpointing differentiates."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers:
        m._can_checkpoint_with_cache = True  # an instance attribute over the class's False
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


def _shared_prompt_token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, Tc) response token log-probs and their mask ``completion_mask`` (R, Tc), with one forward
    per distinct prompt (:func:`batch_logps` sums them over the mask).

    1. the P left-padded prompts go through the model once, keeping their keys and values per
       layer and the logits of their last position (which predict every continuation's first token);
    2. those are indexed to the R rows (``index_select``: each row gets its prompt's keys and
       values, and the gradient of every row flows back into the one prompt forward);
    3. the R responses go through the model on top of them, positions continuing the prompt's.
    Same log-probs and gradients as the flat batch (tests/test_models.py), with or without
    (non-reentrant) gradient checkpointing, for P·Tp + R·Tc instead of R·(Tp + Tc) token positions:
    with n candidates per prompt the prompt is computed once, not n times. Needs
    ``can_share_prompts(model)``.
    """
    from transformers.cache_utils import Cache

    device = next(model.parameters()).device
    prompt_ids, prompt_mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
    ids, mask = batch["completion_ids"].to(device), batch["completion_mask"].to(device)
    rows = batch["prompt_index"].to(device)  # (R,)
    PromptLayer = _prompt_layer_class()
    prompts = Cache(layer_class_to_replicate=PromptLayer)  # a layer per decoder layer, made as they run
    with _checkpointed_layers_keep_cache(model):
        last = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_left_padded_positions(prompt_mask),
                     past_key_values=prompts, use_cache=False, logits_to_keep=1).logits  # (P, 1, V)
        cache = Cache(layers=[PromptLayer((layer.keys.index_select(0, rows), layer.values.index_select(0, rows)))
                              for layer in prompts.layers])  # (P, H, Tp, D) -> (R, H, Tp, D) per layer
        positions = prompt_mask.sum(-1)[rows, None] + torch.arange(ids.shape[1], device=device)  # (R, Tc)
        cont = model(input_ids=ids, attention_mask=torch.cat([prompt_mask[rows], mask], 1), position_ids=positions,
                     past_key_values=cache, use_cache=False)  # logits (R, Tc, V)
    first = token_logps(last[rows], ids[:, :1])  # (R, 1): the prompt's last position predicts token 0
    rest = token_logps(cont.logits[:, :-1], ids[:, 1:])  # (R, Tc-1): response position t predicts t+1
    return torch.cat([first, rest], 1), mask  # (R, Tc), (R, Tc)


@contextlib.contextmanager
def evaluating(model):
    """Inference on ``model`` for the block: eval mode (no dropout) and no grad; its training flag is
    restored after, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def sequence_logps(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    responses: Sequence[str | Sequence[int]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    autocast_bf16: bool = False,
    add_eos: bool = False,
    return_n_tokens: bool = False,
    share_prompts: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π(response | prompt) summed over response tokens, for N pairs -> (N,) float32 on CPU.

    Inference only: no grad, model switched to eval for the call and restored after. Pairs with
    the same prompt ids share one prompt forward (``collate_shared_prompts``: n candidates of a
    prompt cost one prompt, not n); up to ``batch_size`` responses per batch, longest first (so
    memory trouble shows at once), put back in input order. ``return_n_tokens`` also returns the
    counted tokens per pair (N,). ``share_prompts=False`` runs every pair's prompt itself (the
    same numbers at n times the prompt cost; bench/logps.py compares the two), as does a model
    without ``can_share_prompts``, in plain rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = encode_pairs(tokenizer, prompts, responses, max_length=max_length, add_eos=add_eos)
    plain_rows = not can_share_prompts(model)
    share_prompts = share_prompts and not plain_rows
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (p, _) in enumerate(pairs):
        by_prompt.setdefault(tuple(p) if share_prompts else (i,), []).append(i)
    chunks = [rows[k:k + batch_size] for rows in by_prompt.values() for k in range(0, len(rows), batch_size)]
    chunks.sort(key=lambda c: -(len(pairs[c[0]][0]) + max(len(pairs[i][1]) for i in c)))
    batches: list[list[list[int]]] = [[]]
    for chunk in chunks:  # whole chunks (rows of one prompt) into batches of <= batch_size rows
        if batches[-1] and sum(map(len, batches[-1])) + len(chunk) > batch_size:
            batches.append([])
        batches[-1].append(chunk)
    logps = torch.zeros(len(pairs), dtype=torch.float32)
    n_tokens = torch.tensor([len(r) for _, r in pairs], dtype=torch.long)
    device_type = next(model.parameters()).device.type
    with evaluating(model), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast_bf16):
        for batch_chunks in batches:
            idx = [i for chunk in batch_chunks for i in chunk]
            batch = collate_pairs([pairs[i] for i in idx], _pad_id(tokenizer)) if plain_rows else \
                collate_shared_prompts([pairs[c[0]][0] for c in batch_chunks], [pairs[i][1] for i in idx],
                                       [j for j, c in enumerate(batch_chunks) for _ in c], _pad_id(tokenizer))
            logps[idx] = batch_logps(model, batch).float().cpu()
    return (logps, n_tokens) if return_n_tokens else logps


def sequence_token_logps(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    responses: Sequence[str | Sequence[int]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[torch.Tensor]:
    """log p(y_t | prompt, y_<t) of every response token, for N pairs -> N float32 CPU tensors of
    shape (n_tokens_i,). Inference only (no grad, eval mode for the call), flat rows in input order;
    what an analysis inspects token by token (e.g. which tokens CUT's rule marks)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = encode_pairs(tokenizer, prompts, responses, max_length=max_length)
    out: list[torch.Tensor] = []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            lp = batch_token_logps(model, collate_pairs(chunk, _pad_id(tokenizer))).float().cpu()  # (b, Tc)
            out += [lp[i, :len(r)] for i, (_, r) in enumerate(chunk)]
    return out
