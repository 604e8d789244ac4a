"""Candidate sampling speed: HF ``generate`` (fp32, bf16 autocast) vs vLLM, through ``vcb_lib.samplers``.

Every backend runs in a fresh subprocess, back to back, on the same prompts (embedded task prompts
through ``models.format_prompt``), n, max new tokens, temperature, top-p, seed and thread count::

    .venv/bin/python bench/sampling.py                          # SmolLM2-135M, 8 prompts x 4, 64 tokens
    .venv/bin/python bench/sampling.py --model tiny-random --backends hf-fp32,vllm-fp32
    .venv/bin/python bench/sampling.py --prompts 16 --n 8 --max-new-tokens 128 --json out.json

Backends (``--backends``): ``hf-fp32`` (``HFSampler``, fp32 weights), ``hf-bf16`` (``HFSampler`` with
``autocast_bf16=True``, as the library runs it), ``vllm-fp32`` / ``vllm-bf16`` (``VLLMSampler``,
``dtype``; enforce_eager as in the library, CPU KV cache ``VLLM_CPU_KVCACHE_SPACE`` = 4 GiB).

Measured: generated tokens (every token of every completion, EOS included; completions stop at EOS
or ``--max-new-tokens``), seconds of the timed ``generate`` call, tokens/s and its ratio to hf-fp32;
load / engine start-up time and memory are reported apart: ``peak_rss_mib`` is the peak of the
benchmark process itself (for vLLM that excludes its engine and worker processes), ``tree_rss_mib`` the
RSS of the process and all its children right after ``generate`` (current, not peak). Each backend first runs
one untimed warm-up request (1 prompt, n=1, 8 tokens).

Equalised: prompts, n, temperature, top-p (1.0), max new tokens, seed, threads (torch + OMP env;
vLLM's CPU worker gets the same number of cores through ``VLLM_CPU_OMP_THREADS_BIND`` unless it is set).
Not equalised: the random streams differ between backends, so completions (and their lengths, hence
the token counts) differ; HF pads finished rows of a batch until its longest row ends (that time is
counted, those pad tokens are not); HF also keeps the raw logits of every step for the sampler's
log-probs (``output_logits=True``), vLLM returns log-probs of the sampled tokens only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from common import MODELS, child_env, print_cells, spawn_child, split_choices, without_json, write_report

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("hf-fp32", "hf-bf16", "vllm-fp32", "vllm-bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help=f"{' | '.join(MODELS)} or any model spec")
    p.add_argument("--backends", default="hf-fp32,hf-bf16,vllm-fp32", help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--task", default="sentiment", help="embedded task whose train prompts are used")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per HF generate call")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OMP threads, and vLLM's CPU cores (VLLM_CPU_OMP_THREADS_BIND=0-<threads-1> unless set); "
                        "default 1: on a shared 2-core machine 2 threads are several times slower whenever another "
                        "process competes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.spec = MODELS.get(args.model, args.model)
    args.backends = split_choices(p, args.backends, BACKENDS, "backend")
    return args


def prompts_for(args, tokenizer) -> list[str]:
    from vcb_lib.data import task_prompts
    from vcb_lib.models import format_prompt

    return [format_prompt(tokenizer, r["prompt"]) for r in task_prompts(args.task, "train", args.prompts)]


def run_child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from vcb_lib.models import ensure_model_folder, load_policy, load_tokenizer
    from vcb_lib.samplers import HFSampler, VLLMSampler

    kind, dtype = args.child.split("-")
    t0 = time.perf_counter()
    if kind == "hf":
        tok = load_tokenizer(args.spec)
        sampler = HFSampler(load_policy(args.spec, device="cuda" if torch.cuda.is_available() else "cpu"), tok,
                            batch_size=args.batch_size, autocast_bf16=dtype == "bf16")
    else:
        sampler = VLLMSampler(ensure_model_folder(args.spec), dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
                              seed=args.seed)
        tok = sampler.tokenizer
    load_s = time.perf_counter() - t0
    prompts = prompts_for(args, tok)
    request = dict(temperature=args.temperature, top_p=1.0, seed=args.seed)
    sampler.generate(prompts[:1], 1, max_new_tokens=8, **request)  # warm-up, untimed
    t0 = time.perf_counter()
    out = sampler.generate(prompts, args.n, max_new_tokens=args.max_new_tokens, **request)
    gen_s = time.perf_counter() - t0
    completions = [c for cs in out for c in cs]
    tokens = sum(len(c.token_ids) for c in completions)
    import psutil

    me = psutil.Process()
    tree_rss = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20
    return {"backend": args.child, "load_s": load_s, "gen_s": gen_s, "tokens": tokens,
            "completions": len(completions), "stopped": sum(c.finish_reason == "stop" for c in completions),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tree_rss_mib": tree_rss,
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        Path(args.out_file).write_text(json.dumps(run_child(args)))
        return {}
    import torch

    env = child_env(args.threads, TQDM_DISABLE="1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")
    passthrough = without_json(list(argv if argv is not None else sys.argv[1:]))
    rows = []
    for backend in args.backends:
        t0 = time.perf_counter()
        row = spawn_child(__file__, passthrough, backend, env)
        if row is not None:
            rows.append(row)
            print(f"{backend}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    base = next((r for r in rows if r["backend"] == "hf-fp32"), None)
    for r in rows:
        r["tokens/s"] = r["tokens"] / r["gen_s"]
        r["vs hf-fp32"] = r["tokens/s"] / base["tokens/s"] if base else float("nan")
    print(f"\nmodel {args.spec}; {args.prompts} prompts x n={args.n}, max {args.max_new_tokens} new tokens, "
          f"T={args.temperature}; threads {args.threads} (vLLM bind {env['VLLM_CPU_OMP_THREADS_BIND']}); "
          f"{platform.machine()} {os.cpu_count()} cores; "
          f"torch {torch.__version__}")
    cols = ["backend", "tokens", "stopped", "gen_s", "tokens/s", "vs hf-fp32", "load_s", "peak_rss_mib", "tree_rss_mib"]
    fmt = {"tokens/s": "{:,.0f}", "gen_s": "{:.2f}", "vs hf-fp32": "{:.2f}", "load_s": "{:.1f}", "peak_rss_mib": "{:,.0f}",
           "tree_rss_mib": "{:,.0f}"}
    print_cells(cols, [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows])
    return write_report(args, ("child", "out_file"), rows=rows)


if __name__ == "__main__":
    main()
