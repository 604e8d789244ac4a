"""Calibration training speed and memory: our ``Trainer`` (vcb_loss, dpo_loss) vs TRL's ``DPOTrainer``.

Every run is a fresh subprocess (so its peak RSS is its own), started back to back from this script
on the same data, model, precision, thread count, sequences per optimizer step and number of steps::

    .venv/bin/python bench/train_step.py                                 # SmolLM2-135M, fp32, CPU, ~11 min (9 runs)
    .venv/bin/python bench/train_step.py --model tiny-random --steps 8   # seconds
    .venv/bin/python bench/train_step.py --pairs all --data sampled --json out.json

Runs (``--runs``): ``ours-vcb`` (Trainer + vcb_loss, n candidates per prompt, each prompt forwarded
once for its n candidates), ``ours-vcb-flat`` (the same with ``share_prompts=False``: n full rows per
prompt, as before 2026-11-26), ``ours-dpo`` (Trainer + dpo_loss on the same groups; with best_worst
pairs it trains only the 2 candidates the loss reads), ``trl-dpo`` (DPOTrainer with its reference model) and
``trl-dpo-pre`` (DPOTrainer with ``precompute_ref_log_probs=True``: no reference model while training).
With LoRA adapters (peft, the same ``LoraConfig`` on both sides: ``--lora-r``, ``--lora-alpha``,
``--lora-targets``): ``ours-vcb-lora``, ``ours-dpo-lora`` (``Trainer(lora=...)``, what ``training.lora``
does) vs ``trl-dpo-lora`` (``DPOTrainer(peft_config=...)``: its reference is the policy with the adapters
disabled, a forward every step) and ``trl-dpo-pre-lora`` (that reference pass once, at start-up).

Memory floor. Next to each run's peak RSS: the floor of its training, the measured bytes of its
weights, gradients (trained parameters) and optimizer states plus the process baseline (RSS before the
model is loaded), and peak / floor. ``--memory-profile`` runs each child under torch.profiler's memory
timeline and prints what is alive at the peak of live tensor bytes, by kind (parameters, gradients,
optimizer states, activations, temporaries, ...); that run's own timings and RSS are not comparable.

Data. G prompts, each with n candidates: ``--data synthetic`` (default) uses real task prompts padded
with filler words to exactly ``--prompt-tokens`` tokens and random response token ids of exactly
``--response-tokens`` tokens (the last one EOS), so every sequence has the same length and every run
puts exactly the same tokens through the policy per step; ``--data sampled`` samples the responses once
with HF generate from the same model (lengths vary). Rewards are seeded Gaussian noise: this measures
speed, not learning. DPO pairs (ours and TRL alike): ``--pairs best_worst`` (default: argmax vs argmin
reward, one pair per prompt) or ``all`` (every pair with r_w > r_l, n(n-1)/2 per prompt). TRL gets those
pairs as token ids (its ``_prepare_dataset`` is bypassed), identical to what our trainer tokenises.

Equalised: model and weights, precision (fp32 on CPU; ``--bf16`` = bf16 autocast in both), threads
(``torch.set_num_threads`` + OMP/MKL env in every child; default 1, see ``--threads``), sequences per
optimizer step ``--seqs`` (ours: seqs/k prompts x the k candidates the loss reads, k = n for VCB, 2 for
DPO best_worst; TRL: seqs/2 pairs x 2), AdamW
(``torch.optim.AdamW(fused=True)`` in both: our Trainer's, and TRL's own default
``adamw_torch_fused``, see ``--trl-optim``; lr, betas, no weight decay), constant LR without warm-up,
grad clipping 1.0, gradient checkpointing (off in both; ``--gradient-checkpointing``), no checkpoint
writing (TRL ``save_strategy="no"``; our checkpoint/final saves are switched off by a subclass here),
optimizer steps (``--steps``, the first ``--warmup`` not timed). Tokens counted: prompt + response
tokens of every sequence trained on (padding excluded); ours forwards a prompt once for all its
candidates, so it puts fewer token positions through the model for the same sequences (that is the
point of it), and MFU counts the positions really forwarded.

Not equalised (structural): TRL's DPOTrainer keeps a live reference model and runs a reference forward
every step unless ``precompute_ref_log_probs``; ours always reads reference log-probs stored with the
candidates (their pass is timed once here as ``ref pass``, like TRL's precompute in ``init s``). TRL
projects the LM head only on completion positions in tiles (its ``fused_lm_head``) and also computes
entropy / top-1 metrics; ours projects it from the first response position on, in one piece. One of our steps covers seqs/n prompts
with all their candidates (VCB uses every pair of the n; DPO with ``--pairs all`` forms all pairs from n
forwards), a TRL step covers seqs/2 pairs: ``epoch s`` is the time to consume every group (ours) or
every pair built from the same groups (TRL) once.

On a CUDA machine the same script runs bf16 autocast on the GPU and adds peak GPU memory and MFU
(6 x matmul params x token positions forwarded per second, against a measured bf16 matmul peak).
``--model random:pythia-2.8b`` is the paper's policy architecture with random weights (no hub);
``bench/gpu.sh`` runs this at that scale on one GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import MODELS, child_env, print_cells, spawn_child, split_choices, without_json, write_report

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("ours-vcb", "ours-vcb-flat", "ours-dpo", "trl-dpo", "trl-dpo-pre",
        "ours-vcb-lora", "ours-dpo-lora", "trl-dpo-lora", "trl-dpo-pre-lora")
ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt_neox": ["query_key_value", "dense"]}  # --lora-targets attention
FILLER = (" please", " and", " thanks", " ok", " a")  # filler words that pad a prompt to an exact token count


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help=f"{' | '.join(MODELS)} or any model spec (default smollm2)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--data", choices=("synthetic", "sampled"), default="synthetic")
    p.add_argument("--pairs", choices=("best_worst", "all"), default="best_worst", help="DPO pairs from the n candidates")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt")
    p.add_argument("--seqs", type=int, default=8, help="sequences through the policy per optimizer step")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--response-tokens", type=int, default=32, help="exact (synthetic) or max new (sampled) response tokens")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OMP threads in every run (default 1: on a shared 2-core machine 2 threads are 3-4x "
                        "slower whenever another process competes, and the ratio turns into noise)")
    p.add_argument("--repeats", type=int, default=1, help="run the whole set of runs this many times, interleaved")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (default: off on CPU, on on CUDA)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing in both trainers")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="glibc's default allocator settings in every run instead of vcb_lib.launch.MALLOC_ENV "
                        "(large tensors mmapped and page-faulted anew each step)")
    p.add_argument("--trl-optim", default="adamw_torch_fused",
                   help="TRL's optim (default adamw_torch_fused = TRL's own default and the fused AdamW our Trainer uses)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the -lora runs (both sides)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha of the -lora runs (both sides)")
    p.add_argument("--lora-targets", default="attention",
                   help="comma-separated modules that get adapters in the -lora runs, or 'attention' (default): the "
                        "attention projections (Llama/SmolLM2: q_proj,k_proj,v_proj,o_proj; GPT-NeoX/Pythia: "
                        "query_key_value,dense)")
    p.add_argument("--memory-profile", action="store_true",
                   help="print what is alive at the peak of live tensor bytes in each run (torch.profiler memory "
                        "timeline; slow, and that run's timings and RSS are not comparable)")
    p.add_argument("--gamma", type=float, default=0.05, help="γ of VCB / β of DPO")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run each child under torch.profiler and write its op table to DIR/<run>.txt (slows the runs)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one benchmark
    p.add_argument("--data-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.spec = MODELS.get(args.model, args.model)
    args.runs = split_choices(p, args.runs, RUNS, "run")
    args.lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.seqs % args.n or args.seqs % 2:
        p.error(f"--seqs ({args.seqs}) must be a multiple of --n ({args.n}) and of 2")
    if args.n < 2 or args.steps <= args.warmup:
        p.error("need --n >= 2 and --steps > --warmup")
    return args


def use_cuda(args) -> bool:
    import torch

    return torch.cuda.is_available() and not args.cpu


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# Data: built once in the parent, read by every child
# --------------------------------------------------------------------------------------------


def exact_length_prompt(tok, text: str, length: int) -> str:
    """``format_prompt(text')`` whose token ids (as our trainer encodes them) number exactly ``length``."""
    from vcb_lib.logps import encode_pairs
    from vcb_lib.models import format_prompt

    def n_ids(user: str) -> int:
        return len(encode_pairs(tok, [format_prompt(tok, user)], [[]])[0][0])

    words = text.split()
    while len(words) > 1 and n_ids(" ".join(words)) > length:
        words.pop()
    user = " ".join(words)
    for _ in range(4 * length):
        have = n_ids(user)
        if have == length:
            return format_prompt(tok, user)
        if have > length:
            break
        user += FILLER[_ % len(FILLER)]
    raise ValueError(f"cannot build a prompt of exactly {length} tokens from {text!r}; try another --prompt-tokens")


def build_data(args, path: Path) -> dict:
    """Groups (prompt text, prompt ids, response ids, rewards, ref log-probs) and the DPO pairs."""
    import torch

    from vcb_lib.data import task_prompts
    from vcb_lib.logps import encode_pairs, sequence_logps
    from vcb_lib.models import load_policy, load_tokenizer
    from vcb_lib.samplers import HFSampler

    set_threads(args.threads)
    per_step = args.seqs // args.n
    G = math.ceil(args.steps * args.seqs // 2 / per_step) * per_step  # whole steps for ours and (best_worst) TRL
    tok = load_tokenizer(args.spec)
    model = load_policy(args.spec, device="cuda" if use_cuda(args) else "cpu")
    rows = task_prompts("sentiment", "train", G)
    g = torch.Generator().manual_seed(args.seed)
    if args.data == "synthetic":
        prompts = [exact_length_prompt(tok, r["prompt"], args.prompt_tokens) for r in rows]
        V = min(model.config.vocab_size, len(tok))  # random:pythia-* has more embedding rows than token ids
        responses = [[torch.randint(100, V, (args.response_tokens - 1,), generator=g).tolist() + [tok.eos_token_id]
                      for _ in range(args.n)] for _ in prompts]
    else:
        from vcb_lib.models import format_prompt

        prompts = [format_prompt(tok, r["prompt"]) for r in rows]
        sampler = HFSampler(model, tok, batch_size=8)
        out = sampler.generate(prompts, args.n, temperature=1.0, max_new_tokens=args.response_tokens, seed=args.seed)
        responses = [[c.token_ids for c in cs] for cs in out]
    prompt_ids = [p for p, _ in encode_pairs(tok, prompts, [[]] * len(prompts))]
    rewards = torch.randn(G, args.n, generator=g).tolist()

    flat_p = [p for p, rs in zip(prompts, responses) for _ in rs]
    flat_r = [r for rs in responses for r in rs]
    t0 = time.perf_counter()
    ref = sequence_logps(model, tok, flat_p, flat_r, batch_size=args.seqs).view(G, args.n).tolist()
    ref_s = time.perf_counter() - t0
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the children need the whole GPU

    pairs = []  # (group, w, l)
    for b, r in enumerate(rewards):
        if args.pairs == "best_worst":
            w, l = max(range(args.n), key=lambda i: r[i]), min(range(args.n), key=lambda i: r[i])
            if r[w] > r[l]:
                pairs.append((b, w, l))
        else:
            pairs += [(b, w, l) for w in range(args.n) for l in range(args.n) if r[w] > r[l]]
    data = {"prompts": prompts, "prompt_ids": prompt_ids, "responses": responses, "rewards": rewards,
            "ref_logps": ref, "pairs": pairs, "ref_pass_s": ref_s,
            "ref_pass_tokens": sum(len(p) + len(r) for p, rs in zip(prompt_ids, responses) for r in rs)}
    path.write_text(json.dumps(data))
    return data


# --------------------------------------------------------------------------------------------
# Children: one run each
# --------------------------------------------------------------------------------------------


def child_ours(args, data: dict, device: str, bf16: bool) -> dict:
    import dataclasses

    from vcb_lib.config import LoraConfig, load_params
    from vcb_lib.data import CandidateGroup
    from vcb_lib.losses import LossType
    from vcb_lib.models import load_policy, load_tokenizer
    from vcb_lib.trainers import Trainer, prune_groups

    class NoSaveTrainer(Trainer):
        """Our Trainer without checkpoint/final writing (TRL runs with save_strategy="no")."""

        def save_checkpoint(self, step, *, elapsed=0.0):
            return None

        def save_final(self):
            return self.out_dir / "final"

    base_rss = rss_mib()
    groups = [CandidateGroup(f"p{b}", data["prompts"][b], data["responses"][b], data["rewards"][b], data["ref_logps"][b])
              for b in range(len(data["prompts"]))]
    loss = args.child.split("-")[1]  # ours-vcb, ours-vcb-flat, ours-dpo, ours-vcb-lora, ours-dpo-lora

    trained = prune_groups(groups, LossType(loss), {"top_k": 1, "pairs": args.pairs})  # what the Trainer keeps
    k = round(sum(len(g.response_ids) for g in trained) / len(groups))  # candidates trained per prompt
    per_step = args.seqs // k
    cfg = dataclasses.replace(
        load_params(None, []).training, batch_size=per_step, grad_accum=1, max_steps=args.steps,
        epochs=math.ceil(args.steps * per_step / len(groups)), warmup_steps=0, lr_schedule="constant",
        learning_rate=args.lr, weight_decay=0.0, max_grad_norm=1.0, gamma=args.gamma, pairs=args.pairs,
        bf16=bf16, gradient_checkpointing=args.gradient_checkpointing, save_every=0,
        log_with="none")  # TRL runs with report_to="none": neither side writes tracker files
    tok = load_tokenizer(args.spec)
    model = load_policy(args.spec, device=device).train()
    loaded_rss = rss_mib()
    lora = LoraConfig(enabled=True, r=args.lora_r, alpha=args.lora_alpha, target_modules=lora_targets(args, model)) \
        if args.child.endswith("-lora") else None
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        trainer = NoSaveTrainer(model, tok, groups, loss, cfg, out, seed=args.seed,
                                share_prompts=not args.child.endswith("-flat"), lora=lora)
        init_s = time.perf_counter() - t0
        trainer.train()
        rows = [json.loads(ln) for ln in (Path(out) / "log.jsonl").read_text().splitlines() if ln]
    return memory_floor(trainer.model, trainer.optimizer, base_rss) | {"tokens": [r["tokens"] for r in rows], "step_s": [r["tokens"] / r["tokens/s"] for r in rows],
            "loss": [r["loss"] for r in rows], "init_s": init_s, "base_rss": base_rss, "loaded_rss": loaded_rss,
            "seqs_per_step": per_step * k, "epoch_steps": len(groups) / per_step,
            "n_params": matmul_params(model),
            "forwarded_per_token": forwarded_per_token(data["prompt_ids"], trained, trainer.share_prompts)}


def lora_targets(args, model) -> list[str]:
    """``--lora-targets`` as a list, ``attention`` resolved for ``model``'s architecture."""
    if args.lora_targets != ["attention"]:
        return args.lora_targets
    kind = model.config.model_type
    if kind not in ATTENTION:
        raise SystemExit(f"--lora-targets attention: not known for model type {kind!r} (known: {', '.join(ATTENTION)}); "
                         "name the modules")
    return ATTENTION[kind]


def memory_floor(model, optimizer, base_rss: float) -> dict:
    """The floor of a training's memory (MiB), measured on its model and optimizer after training: the
    weights (every distinct parameter storage), the gradients of the trained parameters, the optimizer
    states (every tensor in ``optimizer.state``), and the process baseline ``base_rss`` beside them."""
    import torch

    seen, weights, grads = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:  # a tied weight counts once
            continue
        seen.add(p.data_ptr())
        weights += p.numel() * p.element_size()
        grads += p.numel() * p.element_size() if p.requires_grad else 0
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    mib = 2**20
    return {"weights_mib": weights / mib, "grads_mib": grads / mib, "states_mib": states / mib,
            "floor_mib": base_rss + (weights + grads + states) / mib}


def live_at_peak(prof, device: str) -> dict:
    """What is alive when live tensor bytes peak (torch.profiler's memory timeline, by its categories:
    parameter, gradient, optimizer_state, activation, temporary, input, autograd_detail, unknown), MiB,
    with the seconds since profiling started."""
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    peak = max(range(len(sizes)), key=lambda i: sum(sizes[i]))
    names = {i + 1: c.name.lower() if c is not None else "unknown" for c, i in _CATEGORY_TO_INDEX.items()}
    return {names[i]: sizes[peak][i] / 2**20 for i in sorted(names)} | {
        "live_total": sum(sizes[peak]) / 2**20, "at_s": (times[peak] - times[0]) / 1e6, "of_s": (times[-1] - times[0]) / 1e6}


def forwarded_per_token(prompt_ids: list[list[int]], groups, shared: bool) -> float:
    """Token positions the policy forward computes per counted (prompt + response) token: 1 for full
    rows, (|p| + Σ|r|) / Σ(|p| + |r|) when each prompt runs once for its candidates."""
    counted = sum(len(p) * len(g.response_ids) + sum(map(len, g.response_ids)) for p, g in zip(prompt_ids, groups))
    forwarded = sum(len(p) + sum(map(len, g.response_ids)) for p, g in zip(prompt_ids, groups))
    return forwarded / counted if shared else 1.0


def child_trl(args, data: dict, device: str, bf16: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from vcb_lib.models import load_policy, load_tokenizer

    base_rss = rss_mib()

    class BenchDPOTrainer(DPOTrainer):
        """DPOTrainer fed token ids (identical to what our trainer encodes), counting policy tokens per step."""

        bench_tokens: list[int] = []

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

        def training_step(self, *a, **kw):
            inputs = a[1] if len(a) > 1 else kw["inputs"]
            self.bench_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(*a, **kw)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.loss = [], []

        def on_step_begin(self, targs, state, control, **kw):
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            self.step_s.append(time.perf_counter() - self.t)

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append(logs["loss"])

    pre, lora = args.child.startswith("trl-dpo-pre"), args.child.endswith("-lora")
    P, R = data["prompt_ids"], data["responses"]
    ds = Dataset.from_dict({"prompt_ids": [P[b] for b, _, _ in data["pairs"]],
                            "chosen_ids": [R[b][w] for b, w, _ in data["pairs"]],
                            "rejected_ids": [R[b][l] for b, _, l in data["pairs"]]})
    tok = load_tokenizer(args.spec)
    model = load_policy(args.spec, device=device).train()
    # what TRL loads itself from a hub id; with adapters its reference is the policy with them disabled
    ref_model = None if pre or lora else load_policy(args.spec, device=device)
    peft_config = None
    if lora:  # what vcb_lib.models.apply_lora builds from the same numbers
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules=lora_targets(args, model), bias="none", task_type="CAUSAL_LM")
    loaded_rss = rss_mib()
    with tempfile.TemporaryDirectory() as out:
        ds.save_to_disk(f"{out}/ds")  # a dataset with cache files: TRL's precompute caches its log-probs there
        from datasets import load_from_disk

        ds = load_from_disk(f"{out}/ds")
        cfg = DPOConfig(
            output_dir=f"{out}/trl", per_device_train_batch_size=args.seqs // 2, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, optim=args.trl_optim, beta=args.gamma, loss_type=["sigmoid"],
            max_length=None, precompute_ref_log_probs=pre, precompute_ref_batch_size=args.seqs // 2,
            bf16=bf16, use_cpu=device == "cpu", report_to="none", save_strategy="no", logging_steps=1,
            seed=args.seed, dataloader_num_workers=0, dataloader_drop_last=True, disable_tqdm=True,
            gradient_checkpointing=args.gradient_checkpointing)
        timer = StepTimer()
        t0 = time.perf_counter()
        trainer = BenchDPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds,
                                  processing_class=tok, callbacks=[timer], peft_config=peft_config)
        init_s = time.perf_counter() - t0
        trainer.train()
    return memory_floor(trainer.model, trainer.optimizer, base_rss) | {"tokens": trainer.bench_tokens, "step_s": timer.step_s, "loss": timer.loss, "init_s": init_s,
            "base_rss": base_rss, "loaded_rss": loaded_rss, "seqs_per_step": args.seqs,
            "epoch_steps": len(data["pairs"]) // (args.seqs // 2), "n_params": matmul_params(model)}


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token (MFU's N): all of them but an input embedding
    the output layer does not share (a row lookup, no FLOPs); the attention-score FLOPs (12 x layers x
    hidden x context per token, ~1.5% for Pythia-2.8B at 256 tokens) are left out."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total if embedding.data_ptr() == head.data_ptr() else total - embedding.numel()


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul throughput of the GPU (TFLOP/s), the denominator of MFU."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def run_child(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    set_threads(args.threads)
    import torch

    device = "cuda" if use_cuda(args) else "cpu"
    bf16 = args.bf16 if args.bf16 is not None else device == "cuda"
    data = json.loads(Path(args.data_file).read_text())
    fn = child_ours if args.child.startswith("ours") else child_trl
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities, profile_memory=True) as prof:
            res = fn(args, data, device, bf16)
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        table += "\n" + prof.key_averages(group_by_input_shape=False).table(sort_by="self_cpu_memory_usage", row_limit=15)
        (Path(args.profile) / f"{args.child}.txt").write_text(table)
    elif args.memory_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
            res = fn(args, data, device, bf16)
        res["at_peak"] = live_at_peak(prof, device)
    else:
        res = fn(args, data, device, bf16)
    res |= {"run": args.child, "peak_rss": peak_rss_mib(), "device": device, "bf16": bf16, "load_avg": os.getloadavg()[0],
            "threads": torch.get_num_threads()}
    if device == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["matmul_tflops"] = matmul_peak_tflops()
    Path(args.out_file).write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------
# Parent: data once, children back to back, table
# --------------------------------------------------------------------------------------------


def summarise(reps: list[dict], warmup: int) -> dict:
    """One run's repeats -> one row: s/step is the median of the timed steps of all repeats
    (robust to a competing process stealing a core for a while); peak memory is the largest."""
    res = reps[0]
    step_s = [t for r in reps for t in r["step_s"][warmup:]]
    tokens = [n for r in reps for n in r["tokens"][warmup:]]
    s_step = statistics.median(step_s)
    s = {"run": res["run"], "seqs/step": res["seqs_per_step"], "tokens/step": statistics.mean(tokens),
         "s/step": s_step, "tokens/s": statistics.mean(tokens) / s_step,
         "peak RSS MiB": max(r["peak_rss"] for r in reps),
         "RSS over base MiB": max(r["peak_rss"] - r["base_rss"] for r in reps),
         "floor MiB": max(r["floor_mib"] for r in reps),
         "peak/floor": max(r["peak_rss"] / r["floor_mib"] for r in reps),
         "init s": statistics.median(r["init_s"] for r in reps), "epoch s": res["epoch_steps"] * s_step,
         "load avg": max(r["load_avg"] for r in reps)}
    if "peak_gpu_mib" in res:
        s["peak GPU MiB"] = max(r["peak_gpu_mib"] for r in reps)
        forwarded = s["tokens/s"] * res.get("forwarded_per_token", 1.0)  # positions really computed
        s["MFU %"] = 100 * 6 * res["n_params"] * forwarded / (res["matmul_tflops"] * 1e12)
    return s


INT_COLS = ("tokens/step", "tokens/s", "peak RSS MiB", "RSS over base MiB", "floor MiB", "peak GPU MiB")
PEAK_KINDS = ("parameter", "gradient", "optimizer_state", "activation", "temporary", "autograd_detail", "input", "unknown")


def print_table(rows: list[dict], int_cols=INT_COLS) -> None:
    cols = list(rows[0])
    fmt = {c: (lambda v: f"{v:,.0f}") if c in int_cols
           else (lambda v: f"{v:.2f}") if isinstance(rows[0][c], float) else str for c in cols}
    print_cells(cols, [[fmt[c](r[c]) for c in cols] for r in rows])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return {}
    import platform

    import torch

    device = "cuda" if use_cuda(args) else "cpu"
    bf16 = args.bf16 if args.bf16 is not None else device == "cuda"
    env = child_env(args.threads, glibc_malloc=args.glibc_malloc, TQDM_DISABLE="1")
    results, summaries = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = build_data(args, Path(tmp) / "data.json")
        print(f"data: {len(data['prompts'])} prompts x {args.n} candidates ({args.data}), {len(data['pairs'])} DPO pairs "
              f"({args.pairs}); built in {time.perf_counter() - t0:.1f} s; ref pass over the candidates "
              f"{data['ref_pass_s']:.2f} s ({data['ref_pass_tokens'] / data['ref_pass_s']:,.0f} tokens/s)", flush=True)
        passthrough = without_json(list(argv if argv is not None else sys.argv[1:]))
        for rep in range(args.repeats):
            for run in args.runs:
                t0 = time.perf_counter()
                res = spawn_child(__file__, passthrough, run, env, "--data-file", str(Path(tmp) / "data.json"))
                if res is None:
                    continue
                results.setdefault(run, []).append(res)
                r = results[run][-1]
                print(f"[{rep + 1}/{args.repeats}] {run}: {time.perf_counter() - t0:.1f} s; timed steps "
                      f"{' '.join(f'{t:.2f}' for t in r['step_s'][args.warmup:])} s; load avg {r['load_avg']:.1f}",
                      flush=True)
    summaries = [summarise(results[run], args.warmup) for run in args.runs if run in results]
    print(f"\nmodel {args.spec}; device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
          f"threads {args.threads}; {'bf16 autocast' if bf16 else 'fp32'}; {args.steps} steps, first {args.warmup} untimed, "
          f"x{args.repeats} repeats (s/step = median); "
          f"{args.seqs} sequences/step of {args.prompt_tokens}+{args.response_tokens} tokens"
          f"{'; gradient checkpointing' if args.gradient_checkpointing else ''}; malloc "
          f"{'glibc default' if args.glibc_malloc else 'MALLOC_MMAP_MAX_=' + env.get('MALLOC_MMAP_MAX_', '(unset)')}; "
          f"torch {torch.__version__}")
    if summaries:
        print_table(summaries)
    by = {s["run"]: s for s in summaries}
    floors = [{"run": s["run"], "weights MiB": r["weights_mib"], "grads MiB": r["grads_mib"], "states MiB": r["states_mib"],
               "base MiB": r["base_rss"], "floor MiB": r["floor_mib"], "peak RSS MiB": s["peak RSS MiB"],
               "peak/floor": s["peak/floor"]} for s in summaries for r in results[s["run"]][:1]]
    if floors:
        print("\nmemory floor: weights + gradients (trained parameters) + optimizer states + process baseline (RSS "
              "before the model loads), measured on each run's model and optimizer")
        print_table(floors, int_cols=("weights MiB", "grads MiB", "states MiB", "base MiB", "floor MiB", "peak RSS MiB"))
    peaks = [{"run": run, "at s": f"{r['at_peak']['at_s']:.1f}/{r['at_peak']['of_s']:.1f}",
              "live MiB": r["at_peak"]["live_total"], **{k: r["at_peak"][k] for k in PEAK_KINDS}}
             for run in args.runs for r in results.get(run, [])[:1] if "at_peak" in r]
    if peaks:
        print("\nalive at the peak of live tensor bytes (torch.profiler memory timeline, MiB by kind; 'at s' = when / "
              "profiled seconds)")
        print_table(peaks, int_cols=("live MiB", *PEAK_KINDS))
    ratios = []
    for ours in ("ours-vcb", "ours-vcb-flat", "ours-dpo", "ours-vcb-lora", "ours-dpo-lora"):
        for peer in ("trl-dpo", "trl-dpo-pre", "trl-dpo-lora", "trl-dpo-pre-lora"):
            if ours in by and peer in by and ours.endswith("-lora") == peer.endswith("-lora"):
                a, b = by[ours], by[peer]
                ratios.append({"ours / TRL": f"{ours} / {peer}", "tokens/s": a["tokens/s"] / b["tokens/s"],
                               "s/step": a["s/step"] / b["s/step"], "peak RSS": a["peak RSS MiB"] / b["peak RSS MiB"],
                               "RSS over base": a["RSS over base MiB"] / b["RSS over base MiB"],
                               "epoch s": a["epoch s"] / b["epoch s"]}
                              | ({"peak GPU": a["peak GPU MiB"] / b["peak GPU MiB"]} if "peak GPU MiB" in a else {}))
    if ratios:
        print("\nratios (goals, not asserted: tokens/s >= 1.5; peak memory <= 0.6 full fine-tuning, <= 0.8 LoRA)")
        print_table(ratios, int_cols=())
    return write_report(args, ("child", "data_file", "out_file"), device=device, bf16=bf16, summary=summaries,
                        ratios=ratios, raw=results)


if __name__ == "__main__":
    main()
