"""Stage 03's on-policy methods (issue 20): PPO, RLOO, GRPO and iterative VCB, one rollout loop.

Each method of ``policy_gradient.OnlineMethod`` in ``training.methods`` trains in
``training.online.rounds`` rounds; round r (1-based):

1. **prompts**: ``prompts_per_round`` train prompts, positions (r-1)·P .. r·P-1 of an endless
   sequence of seeded permutations of the prompts D_t uses (``sampling.num_prompts``);
2. **sample**: ``n`` responses per prompt from the CURRENT policy with ``sampling.backend``'s
   sampler, temperature ``online.temperature``, top_p 1, seeded by (run.seed, r) per prompt (vLLM)
   or per chunk of ``sampling.batch_size`` prompts (HF ``generate``), so a resumed or
   multi-process run draws the same tokens. HF samples from the training policy itself; vLLM's
   engine is started once per run and given the policy's weights at the start of every round
   (``VLLMSampler.sync_weights``; one engine per process under ``accelerate launch``). The
   log-probs that train are always the trainer's own (step 3), whichever sampler drew the tokens;
3. **score**: the configured reward (``rewards.reward_model``: the gold reward, the learned reward
   model or a folder) on each response, minus ``missing_eos_penalty`` for a response cut without
   EOS; per-token log-probs of every response under the current policy (``old``) and π_sft
   (``ref``), and the value network's values (PPO). A non-finite reward stops the run with an error
   naming the round and the prompts;
4. **targets**: the method's ``prepare`` (``policy_gradient``): PPO's GAE advantages and returns,
   RLOO's and GRPO's sequence advantages, iterative VCB's reference log-probs;
5. **update**: ``onpolicy.OnPolicyTrainer.update``, ``epochs`` passes of ``minibatches`` optimizer
   steps with the method's objective, its per-token losses reduced as ``loss_aggregation`` says
   (``policy_gradient.aggregation_weights``; the length cap of ``constant`` is the rollout's
   ``max_new_tokens``), with per-token entropies when ``entropy_coef`` > 0; in PPO's first
   ``critic_warmup_rounds`` rounds only the value network steps;
6. **seal**: ``rounds/round-NNNN/``: the round's checkpoint in the offline trainer's format
   (``vcb_lib.checkpoints``: policy + value network in safetensors, optimizer and scheduler states,
   ``trainer_state.json``, ``checksums.json`` last), then ``rollouts.parquet``, ``stats.json``, and a
   manifest whose key is the method's artefact key plus the round; a copy of the rollouts stays in
   ``rollouts/round-NNNN.parquet``. The last two round folders are kept.

Resuming: a run restarts after the newest round whose manifest is current and whose checkpoint is
intact (a round killed before its seal is redone from scratch; a damaged one is set aside as
``rounds/damaged-round-NNNN`` with a ``CheckpointWarning`` and the round before it is tried:
:func:`latest_round`; nothing in a round draws from a global random stream, so the result is the
one an uninterrupted run gives, tested). When the rounds are done the policy is
saved to ``final/`` with ``log.jsonl`` (one row per optimizer step, with its round's reward and
KL) and ``summary.json`` (the compute: policy samples drawn, tokens trained), like every other
method, so stage 04 evaluates it with no special path.

Multi-process (``training.num_processes`` under ``training.accelerate_config``, the offline
trainer's launch path): each process samples and scores every ``world``-th chunk of prompts, the
rows are gathered on every process, and each optimizer step's prompts are split across them.

Command line (what :func:`train` launches through ``accelerate launch``)::

    python -m vcb_lib.stages.online --params P.yaml --method ppo --out OUT --model SPEC --reward gold
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from vcb_lib.config import Config, load_params, resolve_path
from vcb_lib.io import atomic_write_bytes, atomic_write_text, read_json, write_json
from vcb_lib.manifest import Artefact
from vcb_lib.policy_gradient import OnlineMethod, aggregation_weights, check_finite_rewards
from vcb_lib.stages import artefacts

KEEP_ROUNDS = 2
ROUND_NAME = "round-{:04d}"


def round_seed(seed: int, r: int) -> int:
    """The sampling seed of round ``r``: distinct per round, the same on every rerun."""
    return int(hashlib.sha256(f"{seed}/online/{r}".encode()).hexdigest()[:12], 16) % (2**31 - 1)


def round_prompts(prompts: list[dict], r: int, per_round: int, seed: int) -> list[dict]:
    """Round ``r``'s prompts (1-based): positions (r-1)·P .. r·P-1 of an endless sequence of seeded
    permutations of ``prompts``, a new permutation per pass (every prompt once per pass)."""
    if not prompts:
        raise ValueError("no train prompts to sample rounds from")
    out, perms = [], {}
    for pos in range((r - 1) * per_round, r * per_round):
        epoch, i = divmod(pos, len(prompts))
        if epoch not in perms:
            g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/prompts/{epoch}".encode()).hexdigest()[:15], 16))
            perms[epoch] = torch.randperm(len(prompts), generator=g).tolist()
        out.append(prompts[perms[epoch][i]])
    return out


def reward_spec(cfg: Config) -> str:
    """What the rounds score with, as the launched process loads it: ``gold``, the learned reward
    model's folder (stage 01's, checked current) or ``rewards.reward_model`` itself (a reward spec:
    a callable, a judge, a folder / hub id)."""
    choice = cfg.rewards.reward_model
    return str(artefacts.reward_model(cfg).require()) if choice == "learned" else choice


def load_reward(spec: str, cfg: Config):
    from vcb_lib.stages.sft_and_reward import load_reward as load

    return load(cfg, spec)


# --------------------------------------------------------------------------------------------
# One round: sample, score, targets
# --------------------------------------------------------------------------------------------


def collect_round(cfg: Config, method: OnlineMethod, trainer, sampler, ref, reward, prompts: list[dict],
                  r: int) -> tuple[list[dict], dict]:
    """Sample (``sampler``, given the policy's current weights first) and score round ``r`` (this
    process's chunks, then gathered): one dict per response, prompt-major (row p·n + k), with
    per-token ``old_logps``, ``ref_logps`` and ``values`` (PPO). Returns the rows and the seconds
    spent syncing weights, sampling and scoring (this process)."""
    from vcb_lib.logps import encode_pairs
    from vcb_lib.models import format_prompt
    from vcb_lib.user_data import chat_input

    o, s, acc, tok = cfg.training.online, cfg.sampling, trainer.accelerator, trainer.tokenizer
    chosen = round_prompts(prompts, r, o.prompts_per_round, cfg.run.seed)
    bs = s.batch_size
    temperature = o.temperature if method.temperature_in_logps else 1.0
    t0 = time.perf_counter()
    sampler.sync_weights(trainer.policy)
    seconds = {"sync": time.perf_counter() - t0, "sample": 0.0, "score": 0.0}
    rows: list[dict] = []
    trainer.policy.eval()
    try:
        for c in range(acc.process_index, math.ceil(len(chosen) / bs), acc.num_processes):
            chunk = chosen[c * bs:(c + 1) * bs]
            inputs = [format_prompt(tok, chat_input(p)) for p in chunk]
            t0 = time.perf_counter()
            completions = sampler.generate(inputs, o.n, o.temperature, o.max_new_tokens or s.max_new_tokens,
                                           round_seed(cfg.run.seed, r), 1.0, first_index=c * bs)
            t1 = time.perf_counter()
            prompt_ids = [p for p, _ in encode_pairs(tok, inputs, [[]] * len(inputs))]
            flat = [(i, k, comp) for i in range(len(chunk)) for k, comp in enumerate(completions[i])]
            rewards = np.asarray(reward.score([chunk[i]["prompt"] for i, _, _ in flat], [comp.text for _, _, comp in flat]),
                                 dtype=np.float64)
            pids, rids = [prompt_ids[i] for i, _, _ in flat], [comp.token_ids for _, _, comp in flat]
            scored = []  # (old, values, ref) per row, in sub-batches of training.batch_size prompts (peak memory)
            for lo in range(0, len(flat), cfg.training.batch_size * o.n):
                part = slice(lo, lo + cfg.training.batch_size * o.n)
                old, values = trainer.score(pids[part], rids[part], temperature=temperature)
                ref_lp, _ = trainer.score(pids[part], rids[part], temperature=temperature, model=ref)
                scored += [(old[j], None if values is None else values[j], ref_lp[j]) for j in range(old.shape[0])]
            seconds["sample"] += t1 - t0
            seconds["score"] += time.perf_counter() - t1
            for j, (i, k, comp) in enumerate(flat):
                L = len(comp.token_ids)
                old_j, values_j, ref_j = scored[j]
                rows.append({"round": r, "position": c * bs + i, "prompt_id": str(chunk[i]["prompt_id"]),
                             "prompt": chunk[i]["prompt"], "model_input": inputs[i], "prompt_ids": list(prompt_ids[i]),
                             "k": k, "response": comp.text, "response_ids": list(comp.token_ids), "n_tokens": L,
                             "finish_reason": comp.finish_reason, "sampler_logp": comp.logp, "reward": float(rewards[j]),
                             "old_logps": old_j[:L].tolist(), "ref_logps": ref_j[:L].tolist(),
                             "values": None if values_j is None else values_j[:L].tolist()})
    finally:
        trainer.policy.train()
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda row: (row["position"], row["k"]))
    return rows, seconds


def round_tensors(rows: list[dict], n: int, missing_eos_penalty: float) -> dict:
    """The rows as the method's ``prepare`` reads them: ``scores`` (P, n) = reward minus the
    missing-EOS penalty; ``old_logps``, ``ref_logps``, ``old_values`` (PPO), ``mask`` (R, L)."""
    R, L = len(rows), max(row["n_tokens"] for row in rows)
    out = {"mask": torch.zeros(R, L, dtype=torch.bool), "old_logps": torch.zeros(R, L), "ref_logps": torch.zeros(R, L)}
    has_values = rows[0]["values"] is not None
    if has_values:
        out["old_values"] = torch.zeros(R, L)
    for j, row in enumerate(rows):
        m = row["n_tokens"]
        out["mask"][j, :m] = True
        out["old_logps"][j, :m] = torch.tensor(row["old_logps"])
        out["ref_logps"][j, :m] = torch.tensor(row["ref_logps"])
        if has_values:
            out["old_values"][j, :m] = torch.tensor(row["values"])
    reward = torch.tensor([row["reward"] for row in rows], dtype=torch.float32)
    cut = torch.tensor([row["finish_reason"] != "stop" for row in rows], dtype=torch.float32)
    out["scores"] = (reward - missing_eos_penalty * cut).view(R // n, n)
    return out


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _round_dir(out: Path, r: int) -> Path:
    return out / "rounds" / ROUND_NAME.format(r)


def _from_main(acc, obj):
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def latest_round(out: Path, key: dict, rounds: int) -> int:
    """The newest round whose folder is current for ``key`` and whose checkpoint is intact, 0 when
    none (main process). A round never sealed (killed before its manifest) or sealed for another
    config is passed over; a sealed one whose checkpoint fails :func:`vcb_lib.onpolicy.verify_state`
    (checksums, format), whose files changed since its manifest, or whose optimizer or scheduler
    state cannot be read without unpickling is damaged: set aside as ``damaged-round-NNNN``
    (:func:`vcb_lib.checkpoints.set_aside`, a ``CheckpointWarning``) and the round before is tried."""
    from vcb_lib.checkpoints import set_aside
    from vcb_lib.onpolicy import read_state, verify_state

    folder = out / "rounds"
    found = sorted((int(p.name.split("-")[1]) for p in folder.glob("round-[0-9]*") if p.is_dir()), reverse=True) \
        if folder.is_dir() else []
    for r in found:
        if r > rounds:
            continue
        art = Artefact(_round_dir(out, r), "03_train", key | {"round": r})
        state, detail = art.status()
        if state in ("missing", "building", "stale"):  # unsealed, or another config's: redone, nothing damaged
            continue
        problem = verify_state(art.path) or (detail if state != "current" else None)
        if problem is None:
            try:
                read_state(art.path)
                return r
            except ValueError as e:
                problem = f"cannot be read safely: {e}"
        art.invalidate()
        set_aside(art.path, problem, stacklevel=3)
    return 0


def run_rounds(cfg: Config, method: str, out_dir, *, model_spec: str | None = None, reward_spec: str = "gold",
               accelerator=None, log_dir=None, on_round=None, log=print) -> dict:
    """Train ``method`` (an :class:`OnlineMethod`) from π_sft (``model_spec``, default
    ``models.policy``) in ``training.online.rounds`` rounds into ``out_dir``, resuming after its
    newest sealed round; ``on_round(r)`` is called on every process after round r is sealed.
    Returns the summary (also ``out_dir/summary.json``)."""
    from tqdm.auto import tqdm

    from vcb_lib.data import task_of, task_prompts
    from vcb_lib.models import load_policy, load_tokenizer
    from vcb_lib.onpolicy import OnPolicyTrainer, PolicyAndValue, disable_dropout
    from vcb_lib.samplers import make_sampler
    from vcb_lib.trainers import CurveSampler, peak_memory, tracked_values, tracker_dir

    om, o, t = OnlineMethod(method), cfg.training.online, cfg.training
    out = Path(out_dir)
    spec = model_spec or cfg.models.policy
    load = lambda: load_policy(spec, dtype=cfg.models.dtype, cache_dir=cfg.models.cache_dir)  # noqa: E731
    tok = load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
    log_dir = Path(log_dir) if log_dir is not None else tracker_dir(out)
    steps_per_round = o.epochs * o.minibatches
    trainer = OnPolicyTrainer(load(), tok, t, total_steps=o.rounds * steps_per_round, seed=cfg.run.seed,
                              value_backbone=load().get_decoder() if om.value_model else None,
                              accelerator=accelerator, log_dir=log_dir)
    acc = trainer.accelerator
    ref = PolicyAndValue(load()).to(acc.device).eval()  # π_sft, frozen
    disable_dropout(ref)
    ref.requires_grad_(False)
    reward = load_reward(reward_spec, cfg)
    key = artefacts.method_key(cfg, method, cfg.run.seed)
    log_path = out / "log.jsonl"

    done = _from_main(acc, latest_round(out, key, o.rounds) if acc.is_main_process else None)
    elapsed0 = 0.0
    if done:
        trainer.load_state(_round_dir(out, done))
        elapsed0 = read_json(_round_dir(out, done) / "stats.json")["elapsed"]
        log(f"{method}: resuming after round {done} of {o.rounds}")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not done:  # a fresh start: earlier rounds go; rounds set aside as damaged stay for a look
            from vcb_lib.checkpoints import DAMAGED_PREFIX

            for p in sorted((out / "rounds").iterdir()) if (out / "rounds").is_dir() else []:
                if not p.name.startswith(DAMAGED_PREFIX):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            shutil.rmtree(out / "rollouts", ignore_errors=True)
            log_path.unlink(missing_ok=True)
            write_json(out / "training_config.json", dataclasses.asdict(t) | {
                "method": method, "seed": cfg.run.seed, "num_processes": acc.num_processes,
                "total_steps": o.rounds * steps_per_round, "reward": reward_spec})
        elif log_path.is_file():  # drop the rows of a round that was not sealed
            keep = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["round"] <= done]
            atomic_write_text(log_path, "".join(ln + "\n" for ln in keep))
    acc.wait_for_everyone()
    trainer.start_trackers(log_dir, log_path, dataclasses.asdict(t) | {"method": method, "seed": cfg.run.seed})

    prompts = task_prompts(task_of(cfg), "train", cfg.sampling.num_prompts)
    curve = CurveSampler(cfg, tok, out) if cfg.evaluation.curve_points else None
    hparams = {k: getattr(o, k) for k in om.objective_keys} | {k: getattr(t, k) for k in om.hparams}
    temperature = o.temperature if om.temperature_in_logps else 1.0
    sampler = make_sampler(cfg.sampling.backend, spec, model=trainer.policy, tokenizer=tok, batch_size=cfg.sampling.batch_size,
                           dtype=cfg.models.dtype, seed=cfg.run.seed, cache_dir=cfg.models.cache_dir, log=log)
    with contextlib.closing(sampler):
        bar = tqdm(total=o.rounds, initial=done, desc=f"{method} rounds", disable=not acc.is_main_process)
        t_start, update_seconds, update_tokens = time.perf_counter(), 0.0, 0
        for r in range(done + 1, o.rounds + 1):
            t_round = time.perf_counter()
            bar.set_postfix_str(f"round {r}: sampling and scoring", refresh=True)
            rows, seconds = collect_round(cfg, om, trainer, sampler, ref, reward, prompts, r)
            tensors = round_tensors(rows, o.n, o.missing_eos_penalty)
            check_finite_rewards(tensors["scores"], f"{method}, round {r}", [rows[j * o.n]["prompt_id"] for j in range(len(rows) // o.n)])
            fields, metrics = om.prepare(tensors, **{k: getattr(o, k) for k in om.prepare_keys})
            round_stats = {k: float(v) for k, v in metrics.items()} | {
                "round/reward": float(np.mean([row["reward"] for row in rows])),
                "round/response_tokens": float(np.mean([row["n_tokens"] for row in rows])),
                "round/stopped": float(np.mean([row["finish_reason"] == "stop" for row in rows]))}
            per_row = {k: tensors[k] for k in ("mask", "old_logps", "ref_logps", "old_values") if k in tensors}
            if "loss_aggregation" in om.online_keys:
                w, units = aggregation_weights(tensors["mask"], o.loss_aggregation,
                                               max_tokens=o.max_new_tokens or cfg.sampling.max_new_tokens)
                per_row |= {"loss_weights": w, "loss_units": units}
            rollout = {"prompt_ids": [row["prompt_ids"] for row in rows], "response_ids": [row["response_ids"] for row in rows],
                       "n": o.n, "rows": per_row | (fields if om.per_token else {}), "groups": {} if om.per_token else fields}
            first = (r - 1) * steps_per_round
            t_update = time.perf_counter()
            bar.set_postfix_str(f"round {r}: updating ({steps_per_round} steps)", refresh=True)

            def on_step(row: dict, r=r) -> None:
                nonlocal first, update_tokens
                first += 1
                update_tokens += row["tokens"]
                row = {"step": first, "round": r} | row | round_stats | {
                    "elapsed": elapsed0 + time.perf_counter() - t_start}
                if acc.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    acc.log(tracked_values(row), step=row["step"])
                if curve is not None:
                    curve(row["step"], SimpleNamespace(total_steps=trainer.total_steps, accelerator=acc, model=trainer.policy))

            warmup = "critic_warmup_rounds" in om.online_keys and r <= o.critic_warmup_rounds  # PPO: the value network alone
            trainer.update(rollout, om.objective, hparams | ({"critic_only": True} if warmup else {}), per_token=om.per_token,
                           temperature=temperature, epochs=o.epochs, minibatches=o.minibatches,
                           order_key=f"{method}/round{r}", on_step=on_step,
                           entropy="entropy_coef" in om.online_keys and o.entropy_coef > 0, train_policy=not warmup)
            seconds["update"] = time.perf_counter() - t_update
            update_seconds += seconds["update"]
            _seal_round(cfg, om, trainer, out, key, r, rows, tensors, fields, round_stats | {
                f"seconds/{k}": v for k, v in seconds.items()} | {"elapsed": elapsed0 + time.perf_counter() - t_start,
                                                                  "round_seconds": time.perf_counter() - t_round})
            bar.update(1)
            bar.set_postfix(reward=f"{round_stats['round/reward']:.3g}", kl=f"{round_stats['objective/kl']:.3g}")
            if on_round is not None:
                on_round(r)
        bar.close()
    final = trainer.save_final(out / "final")
    summary = _summary(cfg, om, out, final, update_tokens / max(update_seconds, 1e-9)) | peak_memory()
    if acc.is_main_process:
        write_json(out / "summary.json", summary)
    trainer.end_trackers()
    return summary


def _seal_round(cfg: Config, om: OnlineMethod, trainer, out: Path, key: dict, r: int, rows: list[dict], tensors: dict,
                fields: dict, stats: dict) -> None:
    """Write round ``r``'s folder (state, rollouts, stats) and its manifest, last; prune old rounds."""
    acc, folder = trainer.accelerator, _round_dir(out, r)
    art = Artefact(folder, "03_train", key | {"round": r})
    if acc.is_main_process:
        art.invalidate()
        shutil.rmtree(folder, ignore_errors=True)
    acc.wait_for_everyone()
    o = cfg.training.online
    trainer.save_state(folder, {"round": r, "step": r * o.epochs * o.minibatches, "method": om.value})
    if acc.is_main_process:
        mask = tensors["mask"]
        seq = lambda x: torch.where(mask, x, 0.0).sum(-1).tolist()  # noqa: E731  (R, L) -> R sequence sums
        table = pd.DataFrame([{k: v for k, v in row.items() if k not in ("old_logps", "ref_logps", "values", "prompt_ids")}
                              for row in rows])
        table["score"] = tensors["scores"].flatten().tolist()
        table["old_logp"], table["ref_logp"] = seq(tensors["old_logps"]), seq(tensors["ref_logps"])
        if "advantages" in fields:  # the mean advantage of each response's tokens
            table["advantage"] = (torch.tensor(seq(fields["advantages"])) / mask.sum(-1).clamp_min(1)).tolist()
        if "ref_seq" in fields:  # what iterative VCB measured Δπ against
            table["vcb_ref_logp"] = fields["ref_seq"].flatten().tolist()
        data = table.to_parquet(index=False)
        atomic_write_bytes(folder / "rollouts.parquet", data)
        write_json(folder / "stats.json", stats | {"round": r, "method": om.value})
        art.seal()
        (out / "rollouts").mkdir(exist_ok=True)
        atomic_write_bytes(out / "rollouts" / f"{ROUND_NAME.format(r)}.parquet", data)
        for old in sorted(d for d in (out / "rounds").glob("round-[0-9]*") if d.is_dir())[:-KEEP_ROUNDS]:
            Artefact(old, "03_train", {}).invalidate()
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _summary(cfg: Config, om: OnlineMethod, out: Path, final: Path, tokens_per_second: float) -> dict:
    """``summary.json``: the Trainer's keys (steps, loss, tokens/s of the updates, elapsed, final_dir)
    and the compute: rounds, policy samples drawn, tokens trained, seconds per round by phase."""
    o = cfg.training.online
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line] \
        if (out / "log.jsonl").is_file() else []
    stats = [read_json(p) for p in sorted((out / "rounds").glob("round-[0-9]*/stats.json"))]
    phases = {k.split("/", 1)[1]: float(np.mean([s[k] for s in stats])) for k in stats[0] if k.startswith("seconds/")} \
        if stats else {}
    return {"method": om.value, "steps": o.rounds * o.epochs * o.minibatches, "rounds": o.rounds,
            "loss": rows[-1]["loss"] if rows else None, "tokens/s": tokens_per_second,
            "elapsed": rows[-1]["elapsed"] if rows else 0.0, "final_dir": str(final), "log": str(out / "log.jsonl"),
            "policy_samples": o.rounds * o.prompts_per_round * o.n,
            "tokens_trained": int(sum(row["tokens"] for row in rows)), "round_seconds": phases}


# --------------------------------------------------------------------------------------------
# Stage 03's side: launch it like the offline trainer
# --------------------------------------------------------------------------------------------


def train(cfg: Config, method: str, seed: int, art: Artefact, *, log=print) -> None:
    """Launch the rounds of ``method`` with training seed ``seed`` into ``art``'s folder through
    ``accelerate launch`` (``training.num_processes``, ``training.accelerate_config``), resuming."""
    from vcb_lib.launch import launch_subprocess

    params = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed)).save(art.path / "params.yaml")
    args = ["-m", "vcb_lib.stages.online", "--params", str(params), "--method", method, "--out", str(art.path),
            "--model", artefacts.sft_spec(cfg), "--reward", reward_spec(cfg)]
    launch_subprocess(args, cfg.training.num_processes, resolve_path(cfg.training.accelerate_config),
                      cfg.run.device == "cpu", echo=log)


def main(argv=None) -> dict:
    from accelerate import Accelerator

    from vcb_lib.trainers import tracker_dir, tracker_kwargs

    p = argparse.ArgumentParser(prog="python -m vcb_lib.stages.online", description="Train an on-policy method in rounds.")
    p.add_argument("--params", required=True, help="params YAML (stage 03 writes the resolved one)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a parameter")
    p.add_argument("--method", required=True, choices=[m.value for m in OnlineMethod])
    p.add_argument("--out", required=True, help="output folder (rounds/, log.jsonl, final/, summary.json)")
    p.add_argument("--model", default=None, help="π_sft's model spec (default models.policy)")
    p.add_argument("--reward", default="gold", help="gold, or a reward-model folder / hub id")
    args = p.parse_args(argv)
    cfg = load_params(args.params, args.set)
    log_dir = tracker_dir(args.out)
    acc = Accelerator(cpu=cfg.run.device == "cpu", **tracker_kwargs(cfg.training.log_with, log_dir))
    summary = run_rounds(cfg, args.method, args.out, model_spec=args.model, reward_spec=args.reward, accelerator=acc,
                         log_dir=log_dir, log=lambda m: print(m, flush=True) if acc.is_main_process else None)
    if acc.is_main_process:
        print(json.dumps(summary), flush=True)
    acc.end_training()
    return summary


if __name__ == "__main__":
    main()
