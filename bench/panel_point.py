"""Seconds per point of the ablation panel (notebook 06) on a tier: the time the user waits between
pressing Run and seeing the point (issue #18: ≈ 20 s or less on the exact tier, 2 cores).

The panel (``vcb_lib.widgets.AblationPanel``, the object notebook 06 displays) runs in this process,
as in a JupyterLab kernel, over a temporary output root: its base run's upstream (π_sft, D_t: stages
01-02) is built first and timed apart, then each point is started with ``panel.run()`` and waited for.
Points that change a loss hyper-parameter (γ, λ, the loss) reuse that upstream; a new n or
temperature builds its own (SFT + D_t) inside the point, as in the panel.

    .venv/bin/python bench/panel_point.py 2>/dev/null            # params/exact.yaml, 5 points (stages' progress bars go to stderr)
    .venv/bin/python bench/panel_point.py --params params/smoke.yaml --json out.json

Prints the thread setting (``run.threads``), the 1-minute load average before each point, and the
seconds per point with what it changed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, the panel controls it sets): each point is one press of Run after these changes
POINTS = [
    ("γ 0.3 (vcb)", {"gamma": 0.3}),
    ("γ 1.0 (vcb)", {"gamma": 1.0}),
    ("λ 0.3 (vcb)", {"gamma": 0.5, "lam": 0.3}),
    ("loss dpo", {"lam": 1.0, "method": "dpo"}),
    ("n 8 (new D_t)", {"method": "vcb", "n": 8}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(ROOT / "params" / "exact.yaml"), help="params file of the panel (default: the exact tier)")
    p.add_argument("--points", type=int, default=len(POINTS), help=f"how many of the {len(POINTS)} points to run")
    p.add_argument("--json", default=None, help="write the measurements here")
    args = p.parse_args()

    from vcb_lib.config import load_params
    from vcb_lib.runner import thread_limit
    from vcb_lib.stages import ablations
    from vcb_lib.widgets import AblationPanel

    with tempfile.TemporaryDirectory(prefix="vcb-panel-bench-") as tmp:
        overrides = [f"run.output_root={tmp}"]
        cfg = load_params(args.params, overrides)
        print(f"params {args.params}; run.threads {cfg.run.threads or 'torch default'}; {os.cpu_count()} CPUs", flush=True)
        t0 = time.perf_counter()
        with thread_limit(cfg.run.threads):
            ablations.build_upstream(cfg, log=lambda line: None)  # what notebooks 01-02 of the run have built
        upstream = time.perf_counter() - t0
        print(f"upstream of the base run (stages 01-02, once): {upstream:.1f} s", flush=True)

        panel = AblationPanel(args.params, overrides)
        rows = []
        for label, changes in POINTS[:args.points]:
            for name, value in changes.items():
                getattr(panel, name).value = value
            load = os.getloadavg()[0]
            t = time.perf_counter()
            panel.run()
            panel.wait(timeout=900)
            seconds = time.perf_counter() - t
            record = panel.results[-1]
            rows.append({"point": label, "seconds": seconds, "load_1min": load, "win_rate": record["win_rate"],
                         "reward": record["reward"], "kl": record["kl"], "exact": bool(record.get("exact"))})
            print(f"{label:16s} {seconds:6.1f} s   (load {load:.2f})   win rate over π_sft {record['win_rate']:.3f}, "
                  f"reward {record['reward']:.3f}, KL {record['kl']:.3f}{' exact' if record.get('exact') else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"params": args.params, "upstream_seconds": upstream, "points": rows}, indent=2))


if __name__ == "__main__":
    main()
