"""Reference log-prob pass speed: ``logps.sequence_logps`` tokens/s, fp32 vs bf16 autocast, by batch
size, with each prompt run once for its n candidates (``shared``, the library's way) or once per pair
(``flat``, ``share_prompts=False``).

This is the pass that fills ``ref_logp`` of the candidate table once (so calibration training holds
only the policy). Every (precision, batch size) cell runs in a fresh subprocess, back to back, on the
same (prompt, response) pairs and thread count (``--n`` candidates per prompt, as in D_t)::

    .venv/bin/python bench/logps.py                                   # SmolLM2-135M, batches 1/4/8/16, ~7 min
    .venv/bin/python bench/logps.py --model tiny-random --pairs 64
    .venv/bin/python bench/logps.py --precisions fp32 --batch-sizes 8,32 --json out.json

Pairs: embedded task prompts through ``format_prompt`` and random response token ids of
``--response-tokens`` tokens (seeded), the same in every cell. Tokens counted: prompt + response
tokens of every pair (padding excluded; ``shared`` forwards each prompt once, so fewer positions for
the same pairs). Time: the ``sequence_logps``
call after one untimed warm-up call on the first batch. Reported beside it: peak RSS of the process
and the largest |Δ logp| of bf16 against fp32 on the same pairs.

Equalised: pairs, model weights (fp32 in memory for both; bf16 is ``autocast_bf16=True`` as the
library runs it), threads (torch + OMP env), batch = responses per forward. Not equalised: nothing
else varies between cells.
On this CPU (AVX2, no AVX512-BF16/AMX) bf16 matmuls are emulated and slow; on a GPU or an AMX CPU
the comparison turns the other way.
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

from common import MODELS, child_env, print_cells, spawn_child, without_json, write_report

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help=f"{' | '.join(MODELS)} or any model spec")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--pairs", type=int, default=32, help="(prompt, response) pairs scored per cell")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt (pairs / n prompts)")
    p.add_argument("--layouts", default="shared,flat", help="comma-separated subset of shared,flat")
    p.add_argument("--response-tokens", type=int, default=32)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OMP threads (default 1: robust to other processes on a shared 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.spec = MODELS.get(args.model, args.model)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if set(args.precisions) - {"fp32", "bf16"}:
        p.error("--precisions: fp32 and/or bf16")
    if set(args.layouts) - {"shared", "flat"} or not args.layouts:
        p.error("--layouts: shared and/or flat")
    if args.n < 1 or args.pairs % args.n:
        p.error(f"--pairs ({args.pairs}) must be a multiple of --n ({args.n})")
    return args


def make_pairs(args, tokenizer) -> tuple[list[str], list[list[int]]]:
    import torch

    from vcb_lib.data import task_prompts
    from vcb_lib.models import format_prompt

    rows = task_prompts(args.task, "train", 0)
    prompts = [format_prompt(tokenizer, rows[i // args.n % len(rows)]["prompt"]) for i in range(args.pairs)]
    g = torch.Generator().manual_seed(args.seed)
    responses = [torch.randint(100, len(tokenizer), (args.response_tokens,), generator=g).tolist() for _ in prompts]
    return prompts, responses


def run_child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from vcb_lib.logps import encode_pairs, sequence_logps
    from vcb_lib.models import load_policy, load_tokenizer

    layout, precision, batch_size = args.child.split(":")
    batch_size = int(batch_size)
    tok = load_tokenizer(args.spec)
    model = load_policy(args.spec, device="cuda" if torch.cuda.is_available() else "cpu")
    prompts, responses = make_pairs(args, tok)
    tokens = sum(len(p) + len(r) for p, r in encode_pairs(tok, prompts, responses))
    kw = dict(batch_size=batch_size, autocast_bf16=precision == "bf16", share_prompts=layout == "shared")
    sequence_logps(model, tok, prompts[:batch_size], responses[:batch_size], **kw)  # warm-up
    t0 = time.perf_counter()
    logps = sequence_logps(model, tok, prompts, responses, **kw)
    seconds = time.perf_counter() - t0
    return {"layout": layout, "precision": precision, "batch": batch_size, "tokens": tokens, "seconds": seconds,
            "tokens/s": tokens / seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "logps": logps.tolist(), "load_avg": os.getloadavg()[0]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        Path(args.out_file).write_text(json.dumps(run_child(args)))
        return {}
    import torch

    env = child_env(args.threads)
    passthrough = without_json(list(argv if argv is not None else sys.argv[1:]))
    rows = []
    for bs in args.batch_sizes:  # the cells of one batch size back to back
        for precision in args.precisions:
            for layout in args.layouts:
                cell = f"{layout}:{precision}:{bs}"
                row = spawn_child(__file__, passthrough, cell, env)
                if row is not None:
                    rows.append(row)
                    print(f"{cell}: {row['tokens/s']:,.0f} tokens/s", flush=True)
    cells = {(r["layout"], r["precision"], r["batch"]): r for r in rows}
    for r in rows:
        ref = cells.get((r["layout"], "fp32", r["batch"]))
        r["vs fp32"] = r["tokens/s"] / ref["tokens/s"] if ref else float("nan")
        r["max |dlogp| vs fp32"] = max(abs(a - b) for a, b in zip(r["logps"], ref["logps"])) if ref else float("nan")
        flat = cells.get(("flat", r["precision"], r["batch"]))
        r["vs flat"] = r["tokens/s"] / flat["tokens/s"] if flat else float("nan")
        r["max |dlogp| vs flat"] = max(abs(a - b) for a, b in zip(r["logps"], flat["logps"])) if flat else float("nan")
    print(f"\nmodel {args.spec}; {args.pairs} pairs ({args.n} per prompt), responses {args.response_tokens} tokens; "
          f"threads {args.threads}; {platform.machine()} {os.cpu_count()} cores; torch {torch.__version__}")
    cols = ["layout", "precision", "batch", "tokens", "seconds", "tokens/s", "vs fp32", "max |dlogp| vs fp32", "vs flat",
            "max |dlogp| vs flat", "peak_rss_mib", "load_avg"]
    fmt = {"seconds": "{:.2f}", "tokens/s": "{:,.0f}", "vs fp32": "{:.2f}", "max |dlogp| vs fp32": "{:.3g}",
           "vs flat": "{:.2f}", "max |dlogp| vs flat": "{:.3g}", "peak_rss_mib": "{:,.0f}", "load_avg": "{:.1f}"}
    print_cells(cols, [[fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows])
    return write_report(args, ("child", "out_file"), rows=[{k: v for k, v in r.items() if k != "logps"} for r in rows])


if __name__ == "__main__":
    main()
