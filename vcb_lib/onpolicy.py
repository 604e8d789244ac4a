"""The on-policy trainer (issue 20): updates a policy (and, for PPO, a value network) on one round
of rollouts at a time, under ``accelerate`` (one process or DDP). The rounds themselves (sampling,
scoring, resuming) are ``vcb_lib.stages.online``'s; :class:`~vcb_lib.trainers.Trainer` is the
trainer of a fixed D_t, this one of rollouts handed to it round by round. Named by how it runs,
never by method: the method's pure objective (``policy_gradient``) is passed in.

A batch is a group of prompts with their n responses, each row ``prompt ⊕ response``::

    prompts (left-padded, Tp) ⊕ responses (right-padded, L) --forward--> logits of positions Tp-1 .. Tp+L-2
        --/temperature, log-softmax--> (R, L) per-token log π(y_t | x, y_<t);  value head --> (R, L) V(s_t)

``values[t]`` is the value of the state BEFORE token t (prompt + response[:t]), as TRL's PPO reads it.

One optimizer step is a minibatch of the round's prompts (all n responses of each), split into
micro-batches of at most ``training.batch_size`` prompts per process; every process runs the same
number of micro-batches (an empty slot runs one prompt with weight 0, as the Trainer does). The
objective of a step is the sum of its per-token losses over all the minibatch's response tokens
divided by their number (per-prompt losses for iterative VCB: divided by the prompts), whatever
the micro-batch and process split: each micro-batch back-propagates its share times the number
of processes, which DDP's average cancels.

Implementation details of RLHF PPO (Huang et al. 2024, arXiv 2403.17031) that live here: dropout
is switched off in the policy and the value network (:func:`disable_dropout`: the log-probs of the
rollout and of the update then agree, ratio 1 at the first step); log-probs divide the logits by
the sampling temperature; the value network is a separate copy of π_sft's decoder with a scalar
head (its weights ~ N(0, 1/(d+1)), seeded; Huang et al. initialise it from the reward model, which
this workbench does not have when the gold reward scores); one AdamW over both, one gradient clip.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from vcb_lib.checkpoints import MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE, read_file, seal, verify
from vcb_lib.config import TrainingConfig
from vcb_lib.logps import token_logps
from vcb_lib.io import replace_folder
from vcb_lib.trainers import TrainingDiverged, lr_lambda, split_even, tracked_values, tracker_kwargs

Tensor = torch.Tensor
STATE_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, STATE_FILE)  # a round's checkpoint (vcb_lib.checkpoints)
STATE_FORMAT = 1  # trainer_state.json's format of the on-policy rounds
_STATE_KEYS = ("format", "round", "step", "num_processes", "seed")
_ROUND_NAME = re.compile(r"^round-(\d{4,})$")


def verify_state(folder: Path) -> str | None:
    """What is wrong with the round checkpoint ``folder`` (:meth:`OnPolicyTrainer.save_state`), or
    None when it is intact (:func:`vcb_lib.checkpoints.verify`: checksums, format, the round its
    name says, every state file listed)."""
    return verify(folder, state_keys=_STATE_KEYS, format=STATE_FORMAT, needed_files=lambda state: list(STATE_FILES),
                  step_key="round", name_pattern=_ROUND_NAME)


def read_state(folder: Path) -> dict:
    """The optimizer and scheduler states of a verified round checkpoint, read without unpickling
    (``torch.load(weights_only=True)``); ValueError naming a file that cannot be read so."""
    return {"optimizer": read_file(folder, OPTIMIZER_FILE), "scheduler": read_file(folder, SCHEDULER_FILE)}


def disable_dropout(model: torch.nn.Module | None) -> None:
    """Every dropout of ``model`` to 0: ``nn.Dropout`` modules and the float rates attention layers
    read from their config (Llama's ``attention_dropout``), in the modules and in the config."""
    if model is None:
        return
    names = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "summary_first_dropout", "classifier_dropout")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in names:
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
        config = getattr(m, "config", None)
        for name in names:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)


class PolicyAndValue(torch.nn.Module):
    """The policy and, when ``value_backbone`` is given (PPO), the value network: that decoder
    (hidden states) with a scalar head. One module, so that DDP wraps one forward."""

    def __init__(self, policy: torch.nn.Module, value_backbone: torch.nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_backbone = value_backbone
        self.value_head = None
        if value_backbone is not None:
            hidden = value_backbone.config.hidden_size
            p = next(value_backbone.parameters())
            g = torch.Generator().manual_seed(0)  # the same head on every process and every run
            weight = torch.randn(1, hidden, generator=g) / math.sqrt(hidden + 1)
            self.value_head = torch.nn.Linear(hidden, 1, device="meta")  # no draw from the global RNG
            self.value_head.weight = torch.nn.Parameter(weight.to(p.device, p.dtype))
            self.value_head.bias = torch.nn.Parameter(torch.zeros(1, device=p.device, dtype=p.dtype))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, keep: int):
        """(R, T) batch -> logits of the last ``keep`` positions (R, keep, V) and, with a value
        network, its values there (R, keep); else None."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        logits = self.policy(**kwargs, logits_to_keep=keep).logits
        if self.value_backbone is None:
            return logits, None
        hidden = self.value_backbone(**kwargs).last_hidden_state[:, -keep:]  # (R, keep, H)
        return logits, self.value_head(hidden).squeeze(-1)  # (R, keep)


def collate_rollouts(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int) -> dict:
    """R rows (prompt token ids, response token ids) -> one batch with every response starting at
    the same column: ``input_ids``, ``attention_mask``, ``position_ids`` (R, Tp + L) with the
    prompts left-padded to Tp; ``response_ids``, ``response_mask`` (R, L) right-padded. Positions
    count from each row's first real token."""
    if not prompt_ids or len(prompt_ids) != len(response_ids):
        raise ValueError(f"collate_rollouts: need >= 1 row and one response per prompt, got {len(prompt_ids)} "
                         f"prompts and {len(response_ids)} responses")
    if min(map(len, prompt_ids)) < 1 or min(map(len, response_ids)) < 1:
        raise ValueError("collate_rollouts: every prompt and every response needs >= 1 token")
    R, Tp, L = len(prompt_ids), max(map(len, prompt_ids)), max(map(len, response_ids))
    ids = torch.full((R, Tp + L), pad_id, dtype=torch.long)
    mask = torch.zeros((R, Tp + L), dtype=torch.long)
    for r, (p, y) in enumerate(zip(prompt_ids, response_ids)):
        ids[r, Tp - len(p):Tp] = torch.tensor(list(p), dtype=torch.long)
        ids[r, Tp:Tp + len(y)] = torch.tensor(list(y), dtype=torch.long)
        mask[r, Tp - len(p):Tp + len(y)] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "response_ids": ids[:, Tp:], "response_mask": mask[:, Tp:].bool()}


def token_logps_and_values(model, batch: dict, *, temperature: float = 1.0, autocast_bf16: bool = False,
                           with_entropy: bool = False):
    """Per-token log π(y_t | ·) of a :func:`collate_rollouts` batch (R, L) float32, 0 on padding,
    from logits / ``temperature``; and the values (R, L) float32 when ``model`` has a value network
    (else None). ``model`` is a :class:`PolicyAndValue`, possibly wrapped by DDP. ``with_entropy``:
    a third result, the entropy of π(· | x, y_<t) at each response token (R, L), 0 on padding
    (logsumexp(z) - Σ softmax(z)·z of the same tempered logits z; it builds one (R, L, V) tensor)."""
    L = batch["response_ids"].shape[1]
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        logits, values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"], keep=L + 1)
    logits = logits[:, :-1].float()  # (R, L, V): position Tp-1+t predicts response token t
    if temperature != 1.0:
        logits = logits / temperature
    mask = batch["response_mask"]
    lp = token_logps(logits, batch["response_ids"]).masked_fill(~mask, 0.0)  # (R, L)
    if values is not None:
        values = values[:, :-1].float().masked_fill(~mask, 0.0)  # (R, L): V before each response token
    if with_entropy:
        entropy = logits.logsumexp(-1) - (torch.softmax(logits, -1) * logits).sum(-1)  # (R, L, V) -> (R, L)
        return lp, values, entropy.masked_fill(~mask, 0.0)
    return lp, values


def _seed_of(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


class OnPolicyTrainer:
    """Updates ``policy`` (and a value network on ``value_backbone``) round by round.

    Args: ``policy`` a causal LM (π_sft at round 1); ``tokenizer``; ``cfg`` TrainingConfig
    (learning_rate, weight_decay, warmup_steps, lr_schedule, max_grad_norm, batch_size = prompts per
    micro-batch and process, bf16, gradient_checkpointing, log_with); ``total_steps`` optimizer
    steps over all rounds (the schedule's length); ``seed``; ``value_backbone`` (PPO) a decoder
    returning hidden states; ``accelerator`` (created here, with ``cfg.log_with``'s tracker in
    ``log_dir``, when None).
    """

    def __init__(self, policy, tokenizer, cfg: TrainingConfig, *, total_steps: int, seed: int = 0,
                 value_backbone=None, accelerator=None, log_dir: str | os.PathLike | None = None):
        from accelerate import Accelerator

        self.cfg, self.tokenizer, self.seed, self.total_steps = cfg, tokenizer, seed, total_steps
        self.accelerator = acc = accelerator or Accelerator(
            **(tracker_kwargs(cfg.log_with, log_dir) if log_dir is not None else {}))
        self.world, self.rank = acc.num_processes, acc.process_index
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ValueError(f"the on-policy methods sample with the whole policy on every process, which "
                             f"{acc.distributed_type.name} shards: train them with one process or DDP "
                             "(training.accelerate_config: params/accelerate/ddp.yaml)")
        for m in (policy, value_backbone):
            disable_dropout(m)
            if m is not None and cfg.gradient_checkpointing:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module = PolicyAndValue(policy, value_backbone).train()
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_lambda(
            i, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.lr_schedule))
        self.model, self.optimizer = acc.prepare(module, optimizer)
        self.policy = policy  # the causal LM itself (sampling, final/)

    @property
    def module(self) -> PolicyAndValue:
        """The unwrapped :class:`PolicyAndValue` (no DDP collectives: rollout scoring uses it)."""
        return self.accelerator.unwrap_model(self.model)

    # ---------------------------------------------------------------- scoring a round

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
              temperature: float, model=None) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (R, L) and values (R, L or None) of rows under ``model`` (default the
        current policy and value network; π_sft's :class:`PolicyAndValue` for the reference), in
        eval mode, on this process alone."""
        model = model if model is not None else self.module
        was = model.training
        model.eval()
        try:
            batch = {k: v.to(self.accelerator.device) for k, v in collate_rollouts(prompt_ids, response_ids, _pad(self.tokenizer)).items()}
            lp, values = token_logps_and_values(model, batch, temperature=temperature, autocast_bf16=self.cfg.bf16)
        finally:
            model.train(was)
        return lp.cpu(), None if values is None else values.cpu()

    # ---------------------------------------------------------------- updating on a round

    def update(self, rollout: dict, objective: Callable, hparams: dict, *, per_token: bool, temperature: float,
               epochs: int, minibatches: int, order_key: str, on_step: Callable[[dict], None] | None = None,
               entropy: bool = False, train_policy: bool = True) -> int:
        """``epochs`` passes over one round, each split into ``minibatches`` optimizer steps over a
        seeded shuffle of its prompts (seeded by ``order_key`` and the epoch: a resumed run draws
        the same). Returns the optimizer steps taken; each one's log row goes to ``on_step``.

        ``rollout``: ``prompt_ids``, ``response_ids`` (R lists, prompt-major: row p·n + k),
        ``rows`` {name: (R, L) or (R,) tensor, with ``mask`` (R, L)}, ``groups`` {name: (P, n)
        tensor}, ``n``. ``objective(new_logps, new_values, batch, **hparams)`` gets the micro-batch's
        slices and returns per-token losses (R_mb, L) (``per_token``) or per-prompt losses (B,).

        Per-token losses are reduced as ``rows["loss_weights"]`` (R, L) and ``rows["loss_units"]``
        (R,) say when given (``policy_gradient.aggregation_weights``): Σ w·l / Σ units over the
        minibatch; else Σ l / its token count. ``entropy``: the micro-batch's per-token entropies
        go to the objective as ``batch["entropy"]`` (R_mb, L). ``train_policy=False`` (PPO's critic
        warm-up): the policy's parameters get no optimizer step (their gradients are dropped before
        the clip, so AdamW neither moves nor decays them); the value network trains."""
        n, P = rollout["n"], len(rollout["prompt_ids"]) // rollout["n"]
        steps = 0
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(_seed_of(f"{self.seed}/{order_key}/{epoch}"))
            order = torch.randperm(P, generator=g).tolist()
            for mb in split_even(order, minibatches):
                row = self._optimizer_step(rollout, sorted(mb), n, objective, hparams, per_token, temperature,
                                           entropy, train_policy)
                steps += 1
                if on_step is not None:
                    on_step(row | {"epoch": epoch})
        return steps

    def _slice(self, rollout: dict, prompts: list[int], n: int) -> dict:
        rows = [p * n + k for p in prompts for k in range(n)]
        mask = rollout["rows"]["mask"][rows]
        L = max(1, int(mask.sum(-1).max()))
        batch = {k: (v[rows][:, :L] if v.dim() == 2 else v[rows]) for k, v in rollout["rows"].items()}
        batch |= {k: v[prompts] for k, v in rollout["groups"].items()}
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        tokens = collate_rollouts([rollout["prompt_ids"][r] for r in rows], [rollout["response_ids"][r] for r in rows],
                                  _pad(self.tokenizer))
        return batch | {k: v.to(self.accelerator.device) for k, v in tokens.items()}

    def _optimizer_step(self, rollout: dict, minibatch: list[int], n: int, objective: Callable, hparams: dict,
                        per_token: bool, temperature: float, entropy: bool = False, train_policy: bool = True) -> dict:
        acc, cfg = self.accelerator, self.cfg
        mask, loss_units = rollout["rows"]["mask"], rollout["rows"].get("loss_units") if per_token else None
        # metrics are averaged over the minibatch's tokens (per-prompt losses: its prompts); the loss over its units
        units_of = float(sum(int(mask[p * n:(p + 1) * n].sum()) for p in minibatch)) if per_token else float(len(minibatch))
        denom = units_of if loss_units is None else float(sum(float(loss_units[p * n:(p + 1) * n].double().sum())
                                                             for p in minibatch))
        k = max(1, math.ceil(len(minibatch) / (self.world * cfg.batch_size)))  # micro-batches per process
        slots = split_even(minibatch, self.world * k)
        sums: dict[str, float | Tensor] = {}
        for m in range(k):
            idx = slots[m * self.world + self.rank]
            weight = 1.0 if idx else 0.0
            batch = self._slice(rollout, idx or minibatch[:1], n)
            sync = contextlib.nullcontext() if m == k - 1 else acc.no_sync(self.model)
            with sync:
                new_logps, new_values, *ent = token_logps_and_values(self.model, batch, temperature=temperature,
                                                                     autocast_bf16=cfg.bf16, with_entropy=entropy)
                if ent:
                    batch["entropy"] = ent[0]
                losses, metrics = objective(new_logps, new_values, batch, **hparams)
                units = batch["mask"].sum() if per_token else torch.tensor(losses.shape[0])  # tokens or prompts
                weights = batch.get("loss_weights", batch["mask"]) if per_token else None
                total = (losses * weights).sum() if per_token else losses.sum()
                if self._any_rank(not bool(torch.isfinite(total.detach()))):
                    raise TrainingDiverged(f"on-policy update: non-finite loss in micro-batch {m} (on rank {self.rank}: "
                                           f"the round's prompts {idx}); nothing was stepped", step=0, micro_batch=m,
                                           prompt_ids=[str(i) for i in idx])
                acc.backward(total * (weight * self.world / denom))
            units = float(units) * weight
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) * weight
            sums["prompts"] = sums.get("prompts", 0.0) + weight * len(idx or minibatch[:1])
            sums["tokens"] = sums.get("tokens", 0.0) + weight * float(batch["attention_mask"].sum())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * units
        if not train_policy:  # after DDP's all-reduce, the same on every rank: no step, no decay for the policy
            for p in self.module.policy.parameters():
                p.grad = None
        norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        norm = None if norm is None else float(norm)
        if norm is not None and not math.isfinite(norm):  # the same on every rank (after DDP's all-reduce)
            raise TrainingDiverged(f"on-policy update: gradient norm is {norm}; the optimizer did not step",
                                   step=0, micro_batch=None, prompt_ids=[])
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums)
        totals = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=acc.device)
        totals = dict(zip(keys, acc.reduce(totals, "sum").tolist()))
        loss, prompts, tokens = totals.pop("loss"), totals.pop("prompts"), totals.pop("tokens")
        return {"loss": loss / denom, "lr": lr, "grad_norm": norm, "prompts": int(prompts), "tokens": int(tokens),
                **{k: v / units_of for k, v in totals.items()}}

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "sum").item() > 0)

    # ---------------------------------------------------------------- state between rounds

    def save_state(self, folder: Path, state: dict) -> None:
        """A round's checkpoint in ``folder``, in :mod:`vcb_lib.checkpoints`' format, on the main
        process (DDP: every rank holds the same): the policy and value network (safetensors),
        optimizer and scheduler states, ``trainer_state.json`` (``state``: ``round``, ``step``, ...,
        with the format, the process count and the seed) and, last, ``checksums.json``. No RNG
        state: nothing in a round draws from a global random stream."""
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            save_model(self.module, str(folder / MODEL_FILE), force_contiguous=True)
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)
            seal(folder, {"format": STATE_FORMAT, "num_processes": self.world, "seed": self.seed} | state)
        self.accelerator.wait_for_everyone()

    def load_state(self, folder: Path) -> None:
        """What :meth:`save_state` wrote (verified: :func:`verify_state`), on every rank, without unpickling."""
        missing, unexpected = load_model(self.module, str(folder / MODEL_FILE), strict=False,
                                         device=str(self.accelerator.device))
        if missing or unexpected:
            raise ValueError(f"{folder / MODEL_FILE} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        loaded = read_state(folder)
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])

    def save_final(self, target: Path) -> Path:
        """``target`` (``final/``): the policy's ``save_pretrained`` + tokenizer, through a temporary folder."""
        acc = self.accelerator
        tmp = target.with_name(".tmp-" + target.name)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.policy.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            replace_folder(tmp, target)
        acc.wait_for_everyone()
        return target

    # ---------------------------------------------------------------- tracking

    def start_trackers(self, log_dir: Path, log_path: Path, config: dict) -> None:
        """One tracker run (main process; none without ``log_with``), replaying ``log_path``'s kept
        lines, as :class:`~vcb_lib.trainers.Trainer` does."""
        acc = self.accelerator
        if not acc.log_with or not acc.is_main_process:
            return
        shutil.rmtree(log_dir, ignore_errors=True)
        acc.init_trackers(log_dir.name, config={k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                                                for k, v in config.items()})
        if log_path.is_file():
            for line in log_path.read_text().splitlines():
                row = json.loads(line)
                acc.log(tracked_values(row), step=row["step"])

    def end_trackers(self) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


def _pad(tokenizer) -> int:
    from vcb_lib.logps import _pad_id

    return _pad_id(tokenizer)
