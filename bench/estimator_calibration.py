"""Are stage 04's estimators right? Their calibration on the exact tier, where E_π[r] is known
(issue #30 item 3; ``vcb_lib.estimators``; README "Are the estimators right? (exact tier)").

π_sft = the exact task's target distribution over all 1296 responses of its 24 in-distribution
prompts; policies π_opt of Eq. 15 at γ in ``vcb_lib.estimators.GAMMAS`` (KL 0.001 to 2.6 nats).
For each pool shape (m candidates, P prompts drawn with replacement from the 24 per replicate,
k on-policy samples) it draws R replicates, computes the pool (SNIS), on-policy and combined
estimates with stage 04's 95% bootstrap CI over prompts, and prints per policy the exact KL, the
pool's ESS/m, each estimator's bias, coverage and CI half-width; then the validity threshold
``derive_threshold`` finds (``vcb_lib.estimators.POOL_ESS_MIN_FRACTION`` is set from it).

    .venv/bin/python bench/estimator_calibration.py                 # m = 6, k = 2, P = 24 and 144 (+ m = 16, P = 144), R = 400
    .venv/bin/python bench/estimator_calibration.py --replicates 200 --json out.json

Seeded and deterministic: the same arguments print the same numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcb_lib import estimators as E  # noqa: E402


def readme_table(small: dict, large: dict) -> str:
    """The README's compact table: per policy at P = 24 (small) with the pool's coverage at P = 144 (large) too."""
    head = ("| policy | KL(π‖π_sft) | E_π[r] | ESS/m mean | ESS/m p10 | pool bias | pool cover P=24 | pool cover P=144 | "
            "on-policy cover | on-policy ½-width | combined cover | combined ½-width |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in sorted(small.items(), key=lambda kv: kv[1]["kl"]):
        p, o, c = r["pool"], r["on_policy"], r["combined"]
        lines.append(f"| {name} | {r['kl']:.3f} | {r['truth']:.3f} | {r['ess_mean']:.2f} | {r['ess_p10']:.2f} | "
                     f"{p['bias']:+.3f} | {p['coverage']:.2f} | {large[name]['pool']['coverage']:.2f} | "
                     f"{o['coverage']:.2f} | {o['half_width']:.3f} | {c['coverage']:.2f} | {c['half_width']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=400, help="R independent pools and on-policy samples (default 400)")
    ap.add_argument("--k", type=int, default=2, help="on-policy samples per prompt (evaluation.samples_per_prompt's default: 2)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per CI (evaluation.bootstrap's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write every calibration and the threshold here")
    args = ap.parse_args(argv)

    case = E.exact_case()
    shapes = [(6, 24), (6, 144), (16, 144)]  # (m, P): default.yaml's m = 6; 24 prompts; the default run's ~138-prompt pool
    cals, sims = {}, {}
    for m, P in shapes:
        sim = E.simulate(case["ref"], case["policies"], case["rewards"], m=m, k=args.k, prompts=P,
                         replicates=args.replicates, seed=args.seed, bootstrap=args.bootstrap)
        sims[(m, P)], cals[(m, P)] = sim, E.calibrate(sim)
        print(f"\n### m = {m}, P = {P}, k = {args.k}, R = {args.replicates}, bootstrap = {args.bootstrap}\n")
        print(E.table(cals[(m, P)]))
    print("\n### README table (m = 6, k = 2; P = 24 unless named)\n")
    print(readme_table(cals[(6, 24)], cals[(6, 144)]))
    thresholds = {f"m={m},P={P}": E.derive_threshold([sims[(m, P)]], step=0.01)["fraction"] for m, P in shapes}
    rule = E.derive_threshold([sims[(6, 24)], sims[(6, 144)]], step=0.01)
    print(f"\nsmallest ESS/m at which the pool's CI covers >= {rule['target']:.0%} wherever accepted: {thresholds}; "
          f"m = 6 at both P: {rule['fraction']} (POOL_ESS_MIN_FRACTION = {E.POOL_ESS_MIN_FRACTION})")
    if args.json:
        args.json.write_text(json.dumps({"calibration": {f"m={m},P={P}": c for (m, P), c in cals.items()},
                                         "thresholds": thresholds, "threshold_m6": rule["fraction"],
                                         "replicates": args.replicates, "k": args.k, "bootstrap": args.bootstrap,
                                         "seed": args.seed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
