"""One trainer for every stage that learns from groups of responses: SFT, the reward model
(Eq. 18) and every calibration loss of ``losses.py`` (VCB, DPO, IPO, SLiC, RRHF, ReST).

The trainer is named by how it runs (``accelerate``: one process, DDP, FSDP, DeepSpeed), never by
loss. A batch is B prompts, each with its n candidates (:class:`~vcb_lib.data.CandidateGroup`)::

    groups --collate--> (R, T) tokens --score_fn--> (R,) scores --fold--> (B, n) --loss--> (B,)

``score_fn(model, batch) -> (R,)`` is :func:`policy_scores` (summed response log-probs,
``log π(y|x)``) for policies and :func:`reward_scores` (the scalar head at the last token) for the
reward model. The loss is ``loss_type.fn`` with its hyper-parameters read from ``TrainingConfig``.
Reference log-probs come precomputed with the groups: only the trained model is in memory.

Token-level losses and judgments (CUT, ``LossType.token_level`` / ``LossType.judged``) use the same
path one dimension up: :func:`policy_token_scores` gives (R, Tc) per-token log-probs, folded to
(B, n, Tc); judged groups also put each negative candidate in the batch a second time, in its own
judgment's context (``CandidateGroup.judged_prompts``), so one forward scores both contexts and those
rows reach the loss as ``judged_logps`` (B, n, Tc) with ``negative`` (B, n).

Work the maths does not need is skipped (same losses and gradients, tested): candidates the loss
never reads (best-vs-worst pairs, ReST's top_k: ``LossType.used_candidates``) are dropped from the
groups at construction, and a policy's batch runs each prompt once for its n candidates
(``share_prompts``, ``logps.collate_shared_prompts``, also under gradient checkpointing); the
speed-ups are measured in bench/README.md.

Data order (:func:`order_groups`). An epoch is a seeded shuffle of the groups, sorted by length
(longest first) inside mega-batches of 50 optimizer steps, like HF's ``LengthGroupedSampler``: few
pad tokens, and an out-of-memory error shows in the first step. The order depends only on
(seed, epoch, S) with S = batch_size · grad_accum · num_processes, the prompts of one optimizer
step; so every factorisation of S (batch 4 × accumulation 1, 1 × 4, 2 processes × 2) trains on
the same steps.

Averaging. The objective of a step is the mean over ALL its prompts of the per-prompt losses. A
step's S prompts are split into grad_accum × num_processes micro-batch slots (as evenly as possible
in the last, shorter step of an epoch; an empty slot runs one prompt with weight 0, so every rank
does the same number of backward passes). Each micro-batch back-propagates
``Σ_b losses_b · num_processes · grad_accum / N_step``; accelerate divides by grad_accum and DDP
averages over processes, which leaves ``(1/N_step) Σ losses`` whatever B each micro-batch had.

Checkpoints (``out_dir/checkpoints/step-000012/``; :mod:`vcb_lib.checkpoints`, the format the
on-policy rounds share), written without pickle: ``model.safetensors``
(the unwrapped model), ``optimizer.pt`` and ``scheduler.pt`` (state dicts of tensors, numbers, lists
and dicts, read back with ``torch.load(weights_only=True)``), ``scaler.pt`` under fp16, every rank's
RNG states (``rng_state_<rank>.safetensors``: torch CPU and CUDA generators; ``rng_state_<rank>.json``:
Python's ``random`` and numpy's), ``trainer_state.json`` (step, epoch, position in the ordered group
list, S, seed, data fingerprint) and, last, ``checksums.json`` (sha256 and size of every other file).
They are written into ``.tmp-step-000012`` and renamed when whole. The last two are kept. Under
FSDP and DeepSpeed the model and optimizer are sharded: ``accelerator.save_state`` writes them
in accelerate's (DCP's, DeepSpeed's) formats, whose loaders unpickle metadata; the rest is ours.
``final/`` holds ``save_pretrained`` model + tokenizer.

LoRA (``Trainer(lora=...)``, ``training.lora`` for the methods it names: :func:`vcb_lib.models.apply_lora`).
The policy is wrapped by peft; only the adapters have gradients and optimizer states, the reference
log-probs still come with the groups (D_t's, from π_sft), and every loss trains the same way. A
checkpoint holds ``adapter.safetensors`` (the adapters' tensors, under the peft model's parameter
names) instead of ``model.safetensors``, and its ``trainer_state.json`` the adapter config, which a
resume must match. ``final/`` is a whole model all the same: the adapters merged into the weights
(``merge_and_unload``, W + (alpha/r)·B·A), so evaluation, HF and vLLM sampling and the log-prob
passes load it like any other policy; ``final/adapter/`` holds the adapter itself (peft's
``save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``, to load over π_sft with
``PeftModel.from_pretrained``). Adapters run with one process or DDP, not FSDP / DeepSpeed.

``train(resume=True)`` walks the checkpoints newest first and loads the first intact one
(:func:`verify_checkpoint`: every listed file present with its size and sha256, the files the
format needs listed, ``trainer_state.json`` readable): a damaged one is renamed
``damaged-step-*`` with a :class:`CheckpointWarning` naming it and what is wrong, and when none is
intact training starts from scratch with a warning. A resumed run reproduces the uninterrupted one.

A non-finite loss (checked per micro-batch, before its backward) or gradient norm (before the
optimizer step) raises :class:`TrainingDiverged` naming the step, the micro-batch and its prompt ids;
the last checkpoint is left as it was.

Tracking. Every training is one run of accelerate's experiment trackers (``TrainingConfig.log_with``:
``Accelerator(log_with=..., project_dir=...)``, ``init_trackers``, ``log``), which get each optimizer step's
``log.jsonl`` row under the same names (``loss``, ``lr``, ``grad_norm``, ``rewards/chosen``, ``tokens/s``, ...;
the x-axis is ``step``). TensorBoard, the default, writes offline into :func:`tracker_dir`
(``<run>/tensorboard/03_train/<method folder>``, ``<run>/tensorboard/01_models/sft/training``), outside
every artefact's hashed files. That folder mirrors ``log.jsonl``: a fresh start clears it, and a resumed
run clears it and replays the log lines it keeps before logging the steps it trains, so it holds each
step once, whatever was interrupted.

Command line (one process, or under ``accelerate launch`` / :func:`vcb_lib.launch.launch_subprocess`)::

    python -m vcb_lib.trainers --params params/smoke.yaml --method vcb \\
        --candidates outputs/smoke/02_candidates/candidates.parquet --out outputs/smoke/03_train/vcb
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model
from tqdm.auto import tqdm

from vcb_lib.checkpoints import (  # noqa: F401 - the format's names, importable from here as before
    ADAPTER_FILE, CHECKSUMS_FILE, MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE, SCHEDULER_FILE, STATE_FILE,
    CheckpointWarning, checksum_list, file_sha256, read_file, rng_states, seal, set_aside, set_rng_states, verify)
from vcb_lib.config import LoraConfig, TrainingConfig
from vcb_lib.data import CandidateGroup, collate_groups
from vcb_lib.io import atomic_write_text, replace_folder, write_json
from vcb_lib.losses import LossType
from vcb_lib.logps import batch_logps, batch_token_logps, can_share_prompts, sequence_tokens

log = logging.getLogger(__name__)

Tensor = torch.Tensor
ScoreFn = Callable[[torch.nn.Module, dict], Tensor]

MEGA_BATCH_STEPS = 50  # length bucketing: sort by length inside this many optimizer steps
KEEP_CHECKPOINTS = 2
_CKPT_NAME = re.compile(r"^step-(\d{6,})$")
# A checkpoint's files: vcb_lib.checkpoints (the one format of both trainers); checksums.json is
# written last, just before the rename.
ADAPTER_DIR = "adapter"  # LoRA: final/adapter/
CHECKPOINT_FORMAT = 2  # 1: accelerator.save_state for everything (pickled RNG and scheduler states), no checksums
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # distributed types whose model + optimizer accelerate saves
_STATE_KEYS = ("format", "step", "epoch", "step_in_epoch", "position", "step_size", "seed", "data", "num_processes",
               "elapsed", "sharded", "scaler", "accelerator_step")
TRACKER_DIR = "tensorboard"  # <run>/tensorboard/: the offline trackers' files (tracker_dir)
_STAGE_DIR = re.compile(r"^\d\d_\w+$")  # a stage folder of a run: 01_models, 03_train, ...


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; nothing was stepped or saved with it."""

    def __init__(self, message: str, *, step: int, micro_batch: int | None, prompt_ids: list[str]):
        super().__init__(message)
        self.step, self.micro_batch, self.prompt_ids = step, micro_batch, prompt_ids


# --------------------------------------------------------------------------------------------
# Score functions: (model, flat batch) -> (R,) one score per response, with grad
# --------------------------------------------------------------------------------------------


def policy_scores(model, batch: dict[str, Tensor]) -> Tensor:
    """Summed response log-probs log π(y|x) of a causal LM: (R, T) batch -> (R,) float32."""
    return batch_logps(model, batch)


def policy_token_scores(model, batch: dict[str, Tensor]) -> Tensor:
    """Per-token response log-probs log π(y_t|x, y_<t) of a causal LM, for the token-level losses
    (``LossType.token_level``: CUT): (R, T) batch -> (R, Tc) float32, left-aligned, 0 past each response."""
    return batch_token_logps(model, batch)


def reward_scores(model, batch: dict[str, Tensor]) -> Tensor:
    """Scalar head of a sequence-classification model at each row's last real token -> (R,).

    The position comes from ``attention_mask`` (rows are right-padded), not from comparing ids
    with ``pad_token_id`` (which equals eos for SmolLM2, so a response ending in eos would be read
    one token early). The per-token head output is captured with a forward hook on ``model.score``,
    so the call still goes through the DDP/FSDP/DeepSpeed wrapper. Models without a ``score`` head
    (e.g. DeBERTa) fall back to their own pooled ``logits``.
    """
    from accelerate.utils import extract_model_from_parallel

    head = getattr(extract_model_from_parallel(model), "score", None)
    captured: list[Tensor] = []
    handle = head.register_forward_hook(lambda m, i, o: captured.append(o)) if head is not None else None
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    if not captured:
        return out.logits[:, 0].float()  # (R, 1) -> (R,)
    per_token = captured[0][..., 0]  # (R, T, 1) -> (R, T)
    last = batch["attention_mask"].sum(-1) - 1  # (R,)
    return per_token[torch.arange(per_token.shape[0], device=per_token.device), last].float()  # (R,)


# --------------------------------------------------------------------------------------------
# Schedule and data order
# --------------------------------------------------------------------------------------------


def lr_lambda(i: int, *, warmup: int, total: int, schedule: str) -> float:
    """LR multiplier of optimizer step s = i + 1 (LambdaLR passes i = steps taken so far).

    1. warm-up, s <= warmup: s / warmup (step 1 uses lr / warmup, step ``warmup`` the full lr);
    2. then "constant": 1, or "cosine": ½(1 + cos(π (s - warmup) / (total - warmup + 1))),
       decaying towards 0 just after the last step.
    """
    s = i + 1
    if s <= warmup:
        return s / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (s - warmup) / max(1, total - warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; allowed: 'constant', 'cosine'")


def group_lengths(tokenizer, groups: Sequence[CandidateGroup]) -> list[int]:
    """Tokens each group puts into a batch: n · |prompt| + Σ |response| (BOS ignored). A prompt
    is text or already token ids."""
    text = [g.prompt for g in groups if isinstance(g.prompt, str)]
    encoded = iter(tokenizer(text, add_special_tokens=False).input_ids if text else [])
    prompt_ids = [next(encoded) if isinstance(g.prompt, str) else g.prompt for g in groups]
    return [len(p) * len(g.response_ids) + sum(map(len, g.response_ids)) for p, g in zip(prompt_ids, groups)]


def order_groups(lengths: Sequence[int], step_size: int, seed: int, epoch: int,
                 mega_steps: int = MEGA_BATCH_STEPS) -> list[int]:
    """Group indices of one epoch: seeded shuffle, then longest-first inside mega-batches of
    ``mega_steps · step_size`` groups; the step holding the longest group is swapped to the front."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/{epoch}".encode()).hexdigest()[:15], 16))
    perm = torch.randperm(len(lengths), generator=g).tolist()
    size = mega_steps * step_size
    order = [j for i in range(0, len(perm), size) for j in sorted(perm[i:i + size], key=lambda j: -lengths[j])]
    first = max(range(len(order)), key=lambda k: lengths[order[k]]) // step_size * step_size  # start of that step
    head = order[first:first + step_size]
    order[first:first + step_size] = order[:len(head)]
    order[:len(head)] = head
    return order


def split_even(items: list[int], parts: int) -> list[list[int]]:
    """``items`` -> ``parts`` consecutive slices whose sizes differ by at most one (some may be empty)."""
    q, r = divmod(len(items), parts)
    bounds = [k * q + min(k, r) for k in range(parts + 1)]
    return [items[bounds[k]:bounds[k + 1]] for k in range(parts)]


def prune_groups(groups: Sequence[CandidateGroup], loss_type: LossType, hparams: dict) -> list[CandidateGroup]:
    """The groups with only the candidates ``loss_type`` reads (``LossType.used_candidates``), in
    their order: the loss, its gradient and metrics are those of the full groups."""
    n = max(len(g.response_ids) for g in groups)
    mask = torch.tensor([[k < len(g.response_ids) for k in range(n)] for g in groups])  # (G, n)
    rewards = torch.tensor([list(g.rewards) + [0.0] * (n - len(g.rewards)) for g in groups], dtype=torch.float64)
    used = loss_type.used_candidates(rewards, mask, **hparams).tolist()  # (G, n)
    if all(sum(u) == len(g.response_ids) for u, g in zip(used, groups)):
        return list(groups)
    pruned = []
    for g, u in zip(groups, used):
        keep = [k for k in range(len(g.response_ids)) if u[k]]
        judged = {} if g.judged_prompts is None else {"judged_prompts": [g.judged_prompts[k] for k in keep],
                                                      "negative": [g.negative[k] for k in keep]}
        pruned.append(dataclasses.replace(g, response_ids=[g.response_ids[k] for k in keep],
                                          rewards=[g.rewards[k] for k in keep], ref_logps=[g.ref_logps[k] for k in keep],
                                          **judged))
    return pruned


def data_fingerprint(groups: Sequence[CandidateGroup]) -> str:
    return hashlib.sha256("\n".join(g.prompt_id for g in groups).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Checkpoint files: the format is vcb_lib.checkpoints'; what this trainer's state needs
# --------------------------------------------------------------------------------------------


def needed_files(state: dict) -> list[str]:
    """The files a checkpoint with this trainer_state must hold (beyond accelerate's shards)."""
    rng = [f"rng_state_{r}.{ext}" for r in range(state["num_processes"]) for ext in ("safetensors", "json")]
    weights = ADAPTER_FILE if state.get("lora") else MODEL_FILE  # "lora": absent before adapters existed
    own = [] if state["sharded"] else [weights, OPTIMIZER_FILE] + ([SCALER_FILE] if state["scaler"] else [])
    return [STATE_FILE, SCHEDULER_FILE, *own, *rng]


def verify_checkpoint(folder: Path) -> str | None:
    """What is wrong with checkpoint ``folder``, or None when it is intact: checksums.json lists
    every file the trainer state needs, each present with its size and sha256, and
    trainer_state.json is this format's, for this folder's step (:func:`vcb_lib.checkpoints.verify`)."""
    return verify(folder, state_keys=_STATE_KEYS, format=CHECKPOINT_FORMAT, needed_files=needed_files,
                  step_key="step", name_pattern=_CKPT_NAME)


# --------------------------------------------------------------------------------------------
# Experiment tracking (accelerate's trackers)
# --------------------------------------------------------------------------------------------


def tracker_dir(out_dir: str | os.PathLike) -> Path:
    """The tracker folder of the training that writes ``out_dir``: ``<run>/tensorboard/<out_dir inside
    the run>`` when ``out_dir`` lies in a stage folder of a run (the nearest ``NN_<name>`` folder above
    it: ``<run>/03_train/vcb-…`` -> ``<run>/tensorboard/03_train/vcb-…``; a sweep point is a run of its
    own), else ``<out_dir>/tensorboard``."""
    out = Path(out_dir).resolve()
    for folder in (out, *out.parents):
        if _STAGE_DIR.match(folder.name):
            return folder.parent / TRACKER_DIR / out.relative_to(folder.parent)
    return out / TRACKER_DIR


def tracker_kwargs(log_with: str, log_dir: str | os.PathLike) -> dict:
    """``Accelerator`` keywords that make its trackers log a training into ``log_dir`` (TensorBoard's
    event files; :meth:`Trainer.train` names the run ``log_dir.name``): ``{}`` for ``"none"``. A tracker
    whose package is missing is an error naming the install command (accelerate would skip it silently)."""
    if log_with == "none":
        return {}
    from accelerate.tracking import get_available_trackers

    if log_with not in [str(t) for t in get_available_trackers()]:
        raise ValueError(f"training.log_with is {log_with!r}, but {log_with} is not installed in this environment: "
                         f"pip install {log_with} (or set training.log_with to none)")
    return {"log_with": [log_with], "project_dir": str(Path(log_dir).parent)}


def tracked_values(row: dict) -> dict[str, float]:
    """What the trackers get of a ``log.jsonl`` row: every number under its own name but the step
    (their x-axis); a value that is None (DeepSpeed's grad_norm) is left out."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Trains ``model`` on ``groups`` with ``loss_type`` under ``accelerate``.

    Args: ``model`` a causal LM (or a sequence classifier with ``score_fn=reward_scores``);
    ``tokenizer``; ``groups`` the prompts with their candidates; ``loss_type`` a LossType or its
    name; ``cfg`` TrainingConfig (batch_size = prompts per micro-batch and process); ``out_dir``
    where log.jsonl, checkpoints/ and final/ go; ``seed``; ``score_fn`` (model, batch) -> (R,);
    ``accelerator`` (created here if None: create the Trainer inside a launched function);
    ``max_length`` truncation of prompt + response tokens (None = none); ``on_step(step, trainer)``
    called on every rank after each optimizer step and once with step 0 before the first (e.g.
    ``CurveSampler``, Fig. 5); ``share_prompts`` (causal LMs scored by ``policy_scores``) runs
    each prompt once for its n candidates (``logps.batch_logps``, same log-probs and gradients,
    with gradient checkpointing too) where it can: a full-attention model
    (``logps.can_share_prompts``), not under FSDP or DeepSpeed, which then get the flat batch.
    ``log_dir``: this training's tracker folder (default :func:`tracker_dir` of ``out_dir``; cleared
    when training starts); the Accelerator created here logs to ``cfg.log_with`` there, a given
    ``accelerator`` brings its own trackers (``Accelerator(**tracker_kwargs(cfg.log_with, log_dir))``).
    ``lora``: train LoRA adapters on ``model`` instead of every weight (``cfg.lora_for(method)``; None
    or disabled = full fine-tuning); ``model`` is wrapped by peft in place (module docstring).

    Candidates the loss never reads (``LossType.used_candidates``: best-vs-worst pairs, ReST's
    top_k) are dropped from ``groups`` here, so they cost no forward or backward pass.
    """

    def __init__(self, model, tokenizer, groups: Sequence[CandidateGroup], loss_type: LossType | str,
                 cfg: TrainingConfig, out_dir: str | os.PathLike, *, seed: int = 0,
                 score_fn: ScoreFn = policy_scores, accelerator=None, max_length: int | None = None,
                 on_step: Callable[[int, "Trainer"], None] | None = None, share_prompts: bool = True,
                 log_dir: str | os.PathLike | None = None, lora: LoraConfig | None = None):
        from accelerate import Accelerator

        if not groups:
            raise ValueError("Trainer needs at least one group")
        empty = [g.prompt_id for g in groups if not g.response_ids]
        if empty:
            raise ValueError(f"{len(empty)} group(s) have no response, first prompt_id {empty[0]!r}")
        self.loss_type = LossType(loss_type)
        self.hparams = {k: getattr(cfg, k) for k in self.loss_type.hparams}
        self.cfg, self.seed, self.score_fn, self.max_length, self.on_step = cfg, seed, score_fn, max_length, on_step
        if self.loss_type.token_level and score_fn is policy_scores:  # CUT: per-token log-probs (R, Tc), same forward
            self.score_fn = policy_token_scores
        if self.loss_type.judged:
            lacking = [g.prompt_id for g in groups if g.judged_prompts is None or g.negative is None]
            if lacking:
                raise ValueError(f"{self.loss_type} learns from judgments, but {len(lacking)} group(s) carry none (first "
                                 f"prompt_id {lacking[0]!r}): build them with vcb_lib.judgments.judged_candidates and "
                                 "data.candidate_groups(table, **JUDGED_COLUMNS)")
        self.groups, self.tokenizer = prune_groups(groups, self.loss_type, self.hparams), tokenizer
        self.candidates = {"given": sum(len(g.response_ids) for g in groups),
                           "trained": sum(len(g.response_ids) for g in self.groups)}
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.log_path = self.out_dir / "log.jsonl"
        self.log_dir = Path(log_dir) if log_dir is not None else tracker_dir(self.out_dir)

        self.accelerator = acc = accelerator or Accelerator(**tracker_kwargs(cfg.log_with, self.log_dir))
        acc.gradient_accumulation_steps = cfg.grad_accum  # DeepSpeed: keep it "auto" in the config
        ds = getattr(acc.state, "deepspeed_plugin", None)
        if ds is not None and ds.is_auto("train_micro_batch_size_per_gpu"):  # no dataloader to infer it from
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        self.world, self.rank = acc.num_processes, acc.process_index
        self.step_size = cfg.batch_size * cfg.grad_accum * self.world  # prompts per optimizer step
        n_groups = len(self.groups)
        self.steps_per_epoch = math.ceil(n_groups / self.step_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.lengths = group_lengths(tokenizer, self.groups)
        self.fingerprint = data_fingerprint(self.groups)

        self.lora = lora if lora is not None and lora.enabled else None
        if self.lora is not None:
            if score_fn is not policy_scores:
                raise ValueError("LoRA adapters here are for policies (score_fn=policy_scores), not reward models")
            if acc.distributed_type.name in SHARDED:
                raise ValueError(f"training.lora trains adapters with one process or DDP; under "
                                 f"{acc.distributed_type.name} accelerate would checkpoint and gather the whole model: "
                                 "use params/accelerate/single.yaml or ddp.yaml, or turn training.lora off")
            from vcb_lib.models import apply_lora

            model = apply_lora(model, self.lora, seed)  # base weights frozen: only the adapters get grads and AdamW states

        self.share_prompts = share_prompts and score_fn is policy_scores and can_share_prompts(model) \
            and acc.distributed_type.name not in ("FSDP", "DEEPSPEED")  # both wrap forward hooks we have not tested twice per step
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]  # nanoGPT: no decay
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # on biases/norms
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate, fused=ds is None,  # fused kernel (CPU and CUDA; bench/README.md);
        )  # DeepSpeed builds its own
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_lambda(
            i, warmup=cfg.warmup_steps, total=self.total_steps, schedule=cfg.lr_schedule))
        # The scheduler is not prepared: accelerate would step it once per process. Nor is it
        # registered for accelerate's checkpointing (a pickle): save_checkpoint writes it.
        self.model, self.optimizer = acc.prepare(model, optimizer)

    # ---------------------------------------------------------------- one optimizer step

    def _micro_batch(self, step: int, m: int, idx: list[int], weight: float, scale: float) -> dict:
        """Forward + backward of one micro-batch; returns its sums for the step's log."""
        acc = self.accelerator
        groups = [self.groups[j] for j in idx]
        batch = {k: v.to(acc.device) for k, v in collate_groups(
            self.tokenizer, groups, max_length=self.max_length, share_prompts=self.share_prompts,
            judged=self.loss_type.judged).items()}
        mask = batch["mask"]  # (B, n)
        with acc.accumulate(self.model):
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                flat = self.score_fn(self.model, batch).float()  # (R,), or (R, Tc) per token (token-level losses)
            R = int(mask.sum())
            scores = flat.new_zeros((*mask.shape, *flat.shape[1:]))
            scores[mask] = flat[:R]  # (R, ...) -> (B, n, ...)
            inputs = {}
            if "negative" in batch:  # judged: rows R.. are the negative candidates in their judgment's context
                judged = torch.zeros_like(scores)
                judged[batch["negative"]] = flat[R:]  # (R⁻, ...) -> (B, n, ...)
                inputs = {"judged_logps": judged, "negative": batch["negative"]}
            losses, metrics = self.loss_type.fn(scores, batch["ref_logps"], batch["rewards"], mask,
                                                n_tokens=batch["n_tokens"], **inputs, **self.hparams)  # (B,)
            self._check_loss(losses, step, m, groups)
            acc.backward(losses.sum() * (weight * scale))
        n = weight * len(groups)
        return {"loss": losses.detach().sum() * weight, "prompts": n, "tokens": weight * sequence_tokens(batch),
                **{k: v.detach().float() * n for k, v in metrics.items()}}

    def _optimizer_step(self, step: int, chunk: list[int]) -> dict:
        """Optimizer step ``step`` (1-based) over the prompts ``chunk`` (global, all ranks)."""
        acc, cfg, gas = self.accelerator, self.cfg, self.cfg.grad_accum
        slots = split_even(chunk, gas * self.world)  # slot m · world + rank = micro-batch m of rank
        scale = self.world * gas / len(chunk)
        sums: dict[str, Tensor | float] = {}
        step_ids: list[list[str]] = []  # prompt ids of this rank's micro-batches
        for m in range(gas):
            idx = slots[m * self.world + self.rank]
            weight = 1.0 if idx else 0.0  # an empty slot runs one prompt with weight 0
            out = self._micro_batch(step, m, idx or chunk[:1], weight, scale)
            step_ids.append([self.groups[j].prompt_id for j in idx])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
        norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)  # None: DeepSpeed clips (and
        norm = None if norm is None else float(norm)  # steps) inside backward, with its config's gradient_clipping
        if self._any_rank(norm is not None and not math.isfinite(norm)):
            raise TrainingDiverged(
                f"training diverged at step {step}: gradient norm is {norm} (rank {self.rank}; micro-batch "
                f"prompt_ids {step_ids}); the optimizer did not step; last checkpoint: "
                f"{self.latest_checkpoint()}", step=step, micro_batch=None,
                prompt_ids=[p for ids in step_ids for p in ids])
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        keys = sorted(sums)  # the same on every rank
        totals = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=acc.device)
        totals = dict(zip(keys, acc.reduce(totals, "sum").tolist()))  # (K,) summed over ranks
        prompts = totals.pop("prompts")
        row = {"loss": totals.pop("loss") / prompts, "lr": lr, "grad_norm": norm, "prompts": int(prompts),
               "tokens": int(totals.pop("tokens"))}
        return row | {k: v / prompts for k, v in totals.items()}

    def _check_loss(self, losses: Tensor, step: int, m: int, groups: list[CandidateGroup]) -> None:
        """Raise TrainingDiverged (on every rank) if any rank's micro-batch loss is not finite."""
        finite = torch.isfinite(losses.detach())  # (B,)
        bad = not bool(finite.all())
        if not self._any_rank(bad):
            return
        from accelerate.utils import gather_object

        mine = [(self.rank, [g.prompt_id for g, ok in zip(groups, finite.tolist()) if not ok], [g.prompt_id for g in groups])]
        reports = [r for r in (gather_object(mine) if self.world > 1 else mine) if r[1]]
        where = "; ".join(f"rank {r}: non-finite loss for prompt_ids {nan} (micro-batch prompt_ids {ids})"
                          for r, nan, ids in reports)
        raise TrainingDiverged(
            f"training diverged at step {step}, micro-batch {m}: {where}. Nothing was stepped or saved with "
            f"this batch; last checkpoint: {self.latest_checkpoint()}",
            step=step, micro_batch=m, prompt_ids=[p for r in reports for p in r[1]])

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "sum").item() > 0)

    # ---------------------------------------------------------------- the loop

    def train(self, resume: bool = False) -> dict:
        """Train to ``total_steps``; ``resume=True`` continues from the latest checkpoint (or starts
        fresh if there is none). Returns a summary dict (also written to ``out_dir/summary.json``)."""
        from accelerate.utils import set_seed

        acc, cfg = self.accelerator, self.cfg
        start, elapsed0 = self._start(resume, set_seed)
        self._start_trackers()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=start, desc=f"train {self.loss_type}", disable=not acc.is_main_process)
        t0 = time.perf_counter() - elapsed0
        order, order_epoch, row, tok_total, t_run = None, -1, {}, 0, time.perf_counter()
        if self.on_step is not None and start == 0:
            self.on_step(0, self)
        for step in range(start + 1, self.total_steps + 1):
            epoch, i = divmod(step - 1, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = order_groups(self.lengths, self.step_size, self.seed, epoch), epoch
            t_step = time.perf_counter()
            row = self._optimizer_step(step, order[i * self.step_size:(i + 1) * self.step_size])
            now = time.perf_counter()
            tok_total += row["tokens"]
            row = {"step": step, "epoch": epoch + (i + 1) / self.steps_per_epoch} | row | {
                "tokens/s": row["tokens"] / max(now - t_step, 1e-9), "elapsed": now - t0}
            if acc.is_main_process:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                acc.log(tracked_values(row), step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}")
            if self.on_step is not None:
                self.on_step(step, self)
            if cfg.save_every and (step % cfg.save_every == 0 or step == self.total_steps):
                self.save_checkpoint(step, elapsed=now - t0)
        bar.close()
        final = self.save_final()
        summary = {"steps": self.total_steps, "steps_this_run": self.total_steps - start, "loss": row.get("loss"),
                   "tokens/s": tok_total / max(time.perf_counter() - t_run, 1e-9), "elapsed": time.perf_counter() - t0,
                   "final_dir": str(final), "log": str(self.log_path), "checkpoint": str(self.latest_checkpoint()),
                   **peak_memory()}
        if acc.is_main_process:
            write_json(self.out_dir / "summary.json", summary)
        for tracker in acc.trackers:  # this training's tracker run ends here (main() still calls end_training)
            tracker.finish()
        acc.trackers.clear()
        return summary

    def _start_trackers(self) -> None:
        """One tracker run for this training (main process; none without ``log_with``): its folder is
        cleared, then the lines ``log.jsonl`` kept from an interrupted run are replayed, so the run
        holds each step once, as the log does."""
        acc = self.accelerator
        if not acc.log_with or not acc.is_main_process:
            return
        shutil.rmtree(self.log_dir, ignore_errors=True)
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                  for k, v in dataclasses.asdict(self.cfg).items()}
        acc.init_trackers(self.log_dir.name, config=config | {
            "loss_type": str(self.loss_type), "seed": self.seed, "num_processes": self.world,
            "step_size": self.step_size, "total_steps": self.total_steps, "out_dir": str(self.out_dir)})
        if self.log_path.is_file():
            for line in self.log_path.read_text().splitlines():
                row = json.loads(line)
                acc.log(tracked_values(row), step=row["step"])

    def _start(self, resume: bool, set_seed) -> tuple[int, float]:
        """Seed a fresh run, or load the newest intact checkpoint. Returns (steps done, elapsed seconds)."""
        acc = self.accelerator
        latest = self.latest_checkpoint()
        if latest is not None and not resume:
            raise FileExistsError(f"{self.out_dir} holds checkpoints of an earlier run (latest {latest}); "
                                  "pass resume=True to continue it, or use a fresh out_dir")
        state = self._resume() if latest is not None else None
        if state is None:
            set_seed(self.seed)
            if acc.is_main_process:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.log_path.unlink(missing_ok=True)
                write_json(self.out_dir / "training_config.json", dataclasses.asdict(self.cfg) | {
                    "lora": self._lora_state(), "loss_type": str(self.loss_type), "seed": self.seed,
                    "num_processes": self.world, "step_size": self.step_size, "total_steps": self.total_steps, "data": self.fingerprint,
                    "share_prompts": self.share_prompts, "candidates": self.candidates})
            acc.wait_for_everyone()
            return 0, 0.0
        if acc.is_main_process and self.log_path.exists():  # drop log lines of steps that will be redone
            keep = [ln for ln in self.log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= state["step"]]
            atomic_write_text(self.log_path, "".join(ln + "\n" for ln in keep))
        acc.wait_for_everyone()
        return state["step"], state["elapsed"]

    # ---------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders (``step-*``; verified only on resume), oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        found = [p for p in self.ckpt_dir.iterdir() if _CKPT_NAME.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(_CKPT_NAME.match(p.name).group(1)))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, step: int, *, elapsed: float = 0.0) -> Path:
        """States + trainer_state.json + checksums.json into ``.tmp-step-N``, renamed to ``step-N`` when whole."""
        acc = self.accelerator
        final, tmp = self.ckpt_dir / f"step-{step:06d}", self.ckpt_dir / f".tmp-step-{step:06d}"
        sharded = acc.distributed_type.name in SHARDED
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if sharded:  # each rank its shards, in accelerate's formats (DCP / DeepSpeed); replacing those is
            acc.save_state(str(tmp))  # more than this needs. Its pickled RNG file goes: ours replaces it.
            (tmp / f"random_states_{self.rank}.pkl").unlink(missing_ok=True)
        elif acc.is_main_process:  # DDP: every rank holds the same model and optimizer state
            if self.lora is not None:  # the adapters alone: the frozen base is π_sft's, loaded anew on resume
                save_file(self._adapter_tensors(), str(tmp / ADAPTER_FILE))
            else:
                save_model(acc.unwrap_model(self.model), str(tmp / MODEL_FILE), force_contiguous=True)
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / SCALER_FILE)
        if acc.is_main_process:
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
        tensors, plain = rng_states()
        save_file(tensors, str(tmp / f"rng_state_{self.rank}.safetensors"))
        (tmp / f"rng_state_{self.rank}.json").write_text(json.dumps(plain) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            epoch, i = divmod(step, self.steps_per_epoch)
            state = {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "step_in_epoch": i,
                     "position": i * self.step_size, "step_size": self.step_size, "seed": self.seed,
                     "data": self.fingerprint, "num_processes": self.world, "loss_type": str(self.loss_type),
                     "elapsed": elapsed, "sharded": sharded, "scaler": not sharded and acc.scaler is not None,
                     "accelerator_step": acc.step, "lora": self._lora_state()}
            seal(tmp, state)  # trainer_state.json, then checksums.json last
            if final.exists():  # a checkpoint of the same step from an abandoned attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _resume(self) -> dict | None:
        """Load the newest intact checkpoint (every rank) and return its trainer state; None when
        none is intact. The main process verifies (sha256 of every file); every rank then reads its
        files without unpickling. A checkpoint that fails either is renamed ``damaged-step-*``, out of
        the way of this run's saves and pruning, with a CheckpointWarning."""
        acc = self.accelerator
        candidates = self._from_main([p.name for p in reversed(self.checkpoints())])
        skipped = []
        for name in candidates:
            path = self.ckpt_dir / name
            problem = self._from_main(verify_checkpoint(path) if acc.is_main_process else None)
            if problem is None:
                state = json.loads((path / STATE_FILE).read_text())
                expect = {"step_size": self.step_size, "seed": self.seed, "data": self.fingerprint,
                          "lora": self._lora_state()}
                found = {k: state.get(k) for k in expect}  # "lora": absent (None) before adapters existed
                if found != expect:
                    raise ValueError(f"cannot resume exactly from {path}: it was made with {found}, this run has "
                                     f"{expect} (step_size = batch_size · grad_accum · num_processes)")
                try:
                    loaded, error = self._read_checkpoint(path, state), None
                except ValueError as e:
                    loaded, error = None, str(e)
                if not self._any_rank(error is not None):
                    self._apply_checkpoint(path, state, loaded)
                    log.info("resumed from %s (step %d)", path, state["step"])
                    return state
                problem = f"cannot be read safely: {error or 'on another rank'}"
            skipped.append(name)
            if acc.is_main_process:
                set_aside(path, problem, stacklevel=4)
            acc.wait_for_everyone()
        if acc.is_main_process:
            warnings.warn(f"no intact checkpoint in {self.ckpt_dir} (skipped {', '.join(skipped)}): "
                          "training starts from scratch", CheckpointWarning, stacklevel=4)
        return None

    def _read_checkpoint(self, path: Path, state: dict) -> dict:
        """This rank's states from a verified checkpoint, read without unpickling (safetensors,
        JSON, ``torch.load(weights_only=True)``); nothing is applied yet. Raises ValueError naming
        the file that cannot be read so (:func:`vcb_lib.checkpoints.read_file`)."""
        def read(name: str):
            return read_file(path, name)

        loaded = {"scheduler": read(SCHEDULER_FILE)}
        if (path / f"rng_state_{self.rank}.safetensors").is_file():  # absent if made with fewer processes
            loaded["rng"] = read(f"rng_state_{self.rank}.safetensors"), read(f"rng_state_{self.rank}.json")
        if not state["sharded"]:
            weights = ADAPTER_FILE if state.get("lora") else MODEL_FILE
            loaded["model"], loaded["optimizer"] = read(weights), read(OPTIMIZER_FILE)
            if state["scaler"]:
                loaded["scaler"] = read(SCALER_FILE)
        return loaded

    def _apply_checkpoint(self, path: Path, state: dict, loaded: dict) -> None:
        acc = self.accelerator
        if state["sharded"]:  # accelerate's loaders: DCP metadata and DeepSpeed files are pickles
            acc.load_state(str(path))
        elif self.lora is not None:
            model = acc.unwrap_model(self.model)
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            missing, unexpected = sorted(trained - set(loaded["model"])), sorted(set(loaded["model"]) - trained)
            if missing or unexpected:
                raise ValueError(f"{path / ADAPTER_FILE} does not fit the adapters: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            model.load_state_dict(loaded["model"], strict=False)  # the frozen base stays π_sft's
            self.optimizer.load_state_dict(loaded["optimizer"])
            if acc.scaler is not None and "scaler" in loaded:
                acc.scaler.load_state_dict(loaded["scaler"])
        else:
            model = acc.unwrap_model(self.model)
            missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
            params = model.state_dict()  # a tied weight is saved once, under one of its names
            loaded_ptrs = {params[k].data_ptr() for k in loaded["model"] if k in params}
            missing = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]
            if missing or unexpected:
                raise ValueError(f"{path / MODEL_FILE} does not fit the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            self.optimizer.load_state_dict(loaded["optimizer"])
            if acc.scaler is not None and "scaler" in loaded:
                acc.scaler.load_state_dict(loaded["scaler"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        acc.step = state["accelerator_step"]
        if "rng" in loaded:
            set_rng_states(*loaded["rng"])
        else:
            from accelerate.utils import set_seed

            log.warning("%s holds no RNG state for rank %d (made with %d processes): seeding it with %d",
                        path, self.rank, state["num_processes"], self.seed + state["step"])
            set_seed(self.seed + state["step"])

    def _from_main(self, obj):
        """The main process's ``obj``, on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def save_final(self) -> Path:
        """``out_dir/final``: save_pretrained model + tokenizer, through a temporary folder. With LoRA,
        peft's adapter goes to ``final/adapter/`` and the model saved is the merged one; the trainer's
        model holds the merged weights afterwards (on every rank: training is over)."""
        acc = self.accelerator
        target, tmp = self.out_dir / "final", self.out_dir / ".tmp-final"
        model = acc.unwrap_model(self.model)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.lora is not None:
            if acc.is_main_process:
                model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)  # adapter_config.json + weights
            model, state_dict = model.merge_and_unload(), None  # W + (alpha/r)·B·A, in place
        else:
            state_dict = acc.get_state_dict(self.model)  # collective under FSDP/DeepSpeed
        if acc.is_main_process:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            replace_folder(tmp, target)
        acc.wait_for_everyone()
        return target

    def _lora_state(self) -> dict | None:
        """The adapter config a checkpoint records and a resume must match (None: full fine-tuning)."""
        return None if self.lora is None else {k: v for k, v in dataclasses.asdict(self.lora).items() if k != "methods"}

    def _adapter_tensors(self) -> dict[str, Tensor]:
        """The trained tensors of a LoRA run (the adapters), under the peft model's parameter names."""
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# Fig. 5: the policy's samples along training
# --------------------------------------------------------------------------------------------


def curve_steps(total: int, points: int) -> list[int]:
    """Fig. 5 snapshot steps: ``points`` evenly spaced steps strictly between 0 and ``total`` (the
    ends, π_sft and the final model, are sampled by the evaluation anyway)."""
    return sorted({round(i * total / (points + 1)) for i in range(1, points + 1)} - {0, total})


class CurveSampler:
    """``on_step`` hook for the reward-vs-KL curve (Fig. 5; the paper evaluates every 200 steps on
    500 test prompts): at ``curve_steps(total, evaluation.curve_points)`` it samples
    ``evaluation.samples_per_prompt`` responses to the first ``evaluation.curve_prompts`` test
    prompts from the policy being trained, with the evaluation temperature / length / seed, and
    writes ``<out>/curve/step-NNNNN.parquet`` (prompt_id, prompt, model_input, k, response,
    response_ids, n_tokens, policy_logp = raw log π). Notebook 04 adds log π_sft and the reward.

    The main process samples while the other ranks wait; a step whose file exists (a resumed run)
    is skipped. Sampling runs under ``fork_rng``, so training draws the same numbers with or
    without it."""

    def __init__(self, cfg, tokenizer, out_dir: str | os.PathLike):
        from vcb_lib.data import task_of, task_prompts
        from vcb_lib.models import format_prompt
        from vcb_lib.user_data import chat_input

        self.cfg, self.tokenizer, self.dir = cfg, tokenizer, Path(out_dir) / "curve"
        e = cfg.evaluation
        self.prompts = task_prompts(task_of(cfg), "test", e.curve_prompts)
        self.inputs = [format_prompt(tokenizer, chat_input(r)) for r in self.prompts]

    def __call__(self, step: int, trainer: "Trainer") -> None:
        if step not in curve_steps(trainer.total_steps, self.cfg.evaluation.curve_points):
            return
        acc, path = trainer.accelerator, self.dir / f"step-{step:05d}.parquet"
        if acc.is_main_process and not path.is_file():
            import pandas as pd

            from vcb_lib.io import atomic_write_bytes
            from vcb_lib.samplers import HFSampler

            e, model = self.cfg.evaluation, acc.unwrap_model(trainer.model)
            was_training = model.training
            model.eval()
            try:
                out = HFSampler(model, self.tokenizer, batch_size=self.cfg.sampling.batch_size).generate(
                    self.inputs, e.samples_per_prompt, e.temperature, e.max_new_tokens, seed=self.cfg.run.seed + 1000)
            finally:
                model.train(was_training)
            rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "model_input": x, "k": k, "response": c.text,
                     "response_ids": c.token_ids, "n_tokens": len(c.token_ids), "policy_logp": c.logp, "step": step}
                    for r, x, completions in zip(self.prompts, self.inputs, out) for k, c in enumerate(completions)]
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, pd.DataFrame(rows).to_parquet(index=False))
        acc.wait_for_everyone()


# --------------------------------------------------------------------------------------------
# SFT targets (stage 01 trains π_sft with the same Trainer and LossType.SFT)
# --------------------------------------------------------------------------------------------


def sft_groups(tokenizer, prompts: Sequence[str], targets: Sequence[str], ids: Sequence[str]) -> list[CandidateGroup]:
    """One group per prompt: the chat-formatted prompt and its target (+ EOS, so π_sft learns to stop)."""
    from vcb_lib.models import format_prompt

    eos = tokenizer.eos_token_id
    groups = []
    for pid, prompt, target in zip(ids, prompts, targets):
        response = list(tokenizer(target, add_special_tokens=False).input_ids)
        if eos is not None and response[-1:] != [eos]:
            response.append(eos)
        groups.append(CandidateGroup(str(pid), format_prompt(tokenizer, prompt), [response], [0.0], [0.0]))
    return groups


def peak_memory() -> dict:
    """Peak resident memory of this process (MB) and, on CUDA, peak allocated GPU memory (MB)."""
    import resource

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


# --------------------------------------------------------------------------------------------
# Command line: python -m vcb_lib.trainers (under accelerate launch for several processes)
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    from accelerate import Accelerator

    from vcb_lib.config import load_params, methods
    from vcb_lib.models import load_policy, load_tokenizer

    p = argparse.ArgumentParser(prog="python -m vcb_lib.trainers", description="Train a policy on a candidate table.")
    p.add_argument("--params", default=None, help="params YAML (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a parameter")
    p.add_argument("--method", required=True, choices=[m for m in methods() if m in set(LossType)],
                   help="loss (LossType); the on-policy methods train with python -m vcb_lib.stages.online")
    p.add_argument("--candidates", required=True,
                   help="candidate table (parquet): prompt_id, model_input, k, response_ids, reward, ref_logp")
    p.add_argument("--out", required=True, help="output folder (log.jsonl, checkpoints/, final/)")
    p.add_argument("--model", default=None, help="model spec to start from: π_sft (stage 03 passes it; default models.policy)")
    p.add_argument("--max-length", type=int, default=None, help="truncate prompt + response to this many tokens")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    args = p.parse_args(argv)

    import pandas as pd

    from vcb_lib.data import JUDGED_COLUMNS, candidate_groups

    cfg = load_params(args.params, args.set)
    log_dir = tracker_dir(args.out)  # <run>/tensorboard/03_train/<method folder>
    accelerator = Accelerator(cpu=cfg.run.device == "cpu",  # before anything touches a device
                              **tracker_kwargs(cfg.training.log_with, log_dir))
    spec = args.model or cfg.models.policy  # π starts from π_sft (Sec. 4.3)
    model = load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)
    tokenizer = load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
    groups = candidate_groups(pd.read_parquet(args.candidates),  # a judged D_t for CUT (stage 03 writes it)
                              **(JUDGED_COLUMNS if LossType(args.method).judged else {}))
    on_step = None
    if cfg.evaluation.curve_points:
        if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):  # generate on one rank needs the whole model
            raise ValueError(f"evaluation.curve_points samples on the main process, which {accelerator.distributed_type.name} "
                             "shards the model away from: set evaluation.curve_points to 0 (or train with DDP)")
        on_step = CurveSampler(cfg, tokenizer, args.out)
    trainer = Trainer(model, tokenizer, groups, args.method, cfg.training, args.out, seed=cfg.run.seed,
                      accelerator=accelerator, max_length=args.max_length, on_step=on_step, log_dir=log_dir,
                      lora=cfg.training.lora_for(args.method))
    summary = trainer.train(resume=args.resume)
    if accelerator.is_main_process:
        print(json.dumps(summary), flush=True)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
