"""``<run>/report.md``: the run's tables and figures in the paper's layout (notebook 05), and the
ablation section (notebook 06). Every label (the reference method, the evaluation reward) comes
from the run's own metrics."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from vcb_lib.io import atomic_write_text
from vcb_lib.judge import WEAK_JUDGES
from vcb_lib.metrics import MDE_FACTOR


def _table(rows: dict, columns: list[str], fmt: str = "{:.3f}", label: str = "method") -> str:
    head = f"| {label} | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for method, values in rows.items():
        cells = [fmt.format(values[c]) if isinstance(values.get(c), (int, float)) else str(values.get(c, "")) for c in columns]
        body += f"| {method} | " + " | ".join(cells) + " |\n"
    return head + body


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–"


def _verdict(diff: float, ci, better: str, worse: str) -> str:
    """A claim "a > b" judged by the CI of a - b: resolved either way, or not resolved."""
    if not ci:
        return "not resolved (no interval)"
    if ci[0] > 0:
        return f"**reproduced**: {better} (Δ = {diff:+.3f}, 95% CI {_ci(ci)})"
    if ci[1] < 0:
        return f"**contradicted**: {worse} (Δ = {diff:+.3f}, 95% CI {_ci(ci)})"
    return f"not resolved: the 95% CI {_ci(ci)} of Δ = {diff:+.3f} includes 0"


def _family_note(pool: dict, key: str) -> str:
    """"; family-wise (Holm): resolved" for a comparison of the resolution table's family, "" without one."""
    f = ((pool.get("family") or {}).get("comparisons") or {}).get(key)
    if not f:
        return ""
    return f"; family-wise (Holm): {'resolved' if f['resolved'] else 'not resolved'}, adjusted p {f['p_holm']:.3g}"


def _decided_note(pool: dict) -> list[str]:
    """Which estimator decided the table's comparisons, when the on-policy samples checked the pool."""
    by = {k: v.get("decided_by") for k, v in pool["paired"].items() if v.get("decided_by")}
    if not by:
        return []
    on = [k.replace("-vs-", " vs ") for k, d in by.items() if d == "on-policy"]
    text = ("Each comparison is decided by the pool where the pool is valid for both of its policies (next table), "
            "else by the policies' own samples (on-policy means per prompt, paired: every policy sampled the same "
            "prompts with the same seeds); `decided by` says which, and Δ, its CI, p and MDE are that estimator's")
    return [text + (f". Decided on-policy: {', '.join(on)}.\n" if on else "; here the pool decided every one.\n")]


def validity_section(pool: dict) -> list[str]:
    """Per policy: the pool's estimate beside its on-policy one, their difference with its CI, the ESS,
    and whether the pool is valid for it (``evaluate.pool_validity``)."""
    rows = {}
    for name, v in pool["methods"].items():
        val = v.get("validity")
        if val is None:
            continue
        rows[name] = {"pool": v["gold"], "on-policy": v["on_policy"], "on-policy CI": _ci(v["on_policy_ci"]),
                      "pool − on-policy": val["bias"], "95% CI": _ci(val["bias_ci"]),
                      "ESS/m mean": val["ess_fraction"]["mean"], "ESS/m p10": val["ess_fraction"]["p10"],
                      "verdict": "valid" if val["valid"] else "pool not valid: " + "; ".join(val["why_not"])}
    if not rows:
        return []
    from vcb_lib.estimators import POOL_ESS_MIN_FRACTION

    prompts = next(iter(pool["methods"].values())).get("on_policy_prompts")
    return [f"### Is the pool valid for each policy? (on-policy check: {prompts} prompts, the pool's length cap, T = 1)\n",
            "The pool's importance-weighted estimate against each policy's mean over its own samples on the same prompts "
            "(Δ with a 95% bootstrap CI over prompts: it should include 0), and the per-prompt ESS as a share of m. The "
            f"pool is valid for a policy when that Δ's CI includes 0 and its mean ESS/m ≥ {POOL_ESS_MIN_FRACTION:g}: the "
            "share at which the pool's CI still covered the truth in ≥ 90% of replicates on the exact tier "
            "(README, \"Are the estimators right?\"; self-normalised importance sampling is biased by O(1/m), a bias more "
            "prompts do not shrink).\n",
            _table(rows, ["pool", "on-policy", "on-policy CI", "pool − on-policy", "95% CI", "ESS/m mean", "ESS/m p10",
                          "verdict"])]


def pool_sections(metrics: dict) -> list[str]:
    """The report's opening: the resolution table of the paired pool estimates, the paper's claims
    judged by their CIs, the per-policy pool table, and what scored D_t."""
    pool = metrics.get("pool")
    if not pool:
        return []
    ref, gold, P, m = pool["reference"], pool["gold_name"], pool["prompts"], pool["candidates_per_prompt"]
    family = (pool.get("family") or {}).get("comparisons") or {}
    checked = any(v.get("decided_by") for v in pool["paired"].values())
    lines = [f"## Resolution: paired differences on the shared pool ({P} test prompts × {m} candidates from π_sft)\n"
             if not checked else f"## Resolution: paired differences, each decided by an estimator valid for it\n"]
    where = (f"estimated on the same candidates by self-normalised importance weights π/π_sft" if not checked else
             f"estimated on the shared pool ({P} test prompts × {m} candidates from π_sft, self-normalised importance "
             "weights π/π_sft) where the pool is valid for both policies, else on the policies' own samples of the same "
             "prompts")
    if family:  # Holm over the table's comparisons (stages.analysis.pool_family)
        n, alpha = len(family), pool["family"]["alpha"]
        boot = next(iter(family.values()))["bootstrap"]

        def resolved(k: str, v: dict) -> str:
            f = family[k]
            return "yes" if f["resolved"] else ("alone only, not after Holm" if v["resolved"] else "not resolved")

        def p_text(p: float) -> str:  # a bootstrap p-value resolves 2/resamples
            return f"< {2 / boot:.1g}" if p == 0 else f"{p:.3g}"

        rows = {k.replace("-vs-", " vs "): v | {"95% CI": _ci(v["ci"]), "p": p_text(family[k]["p"]),
                                                "Holm p": p_text(family[k]["p_holm"]), "resolved": resolved(k, v),
                                                "decided by": v.get("decided_by", "pool")}
                for k, v in pool["paired"].items()}
        lines += [f"Expected {gold} of each policy, {where}; Δ = {ref} − the other, 95% percentile bootstrap CI over prompts (each comparison "
                  f"alone). **resolved** controls the family-wise error over the table's {n} comparisons at {alpha:g} "
                  f"(the chance that any of them is called resolved when its Δ is 0): Holm's step-down method on the "
                  f"two-sided percentile-bootstrap p-values over prompts (p, from {boot:,} resamples: at least 50 "
                  f"beyond the strictest level, 1 − {alpha:g}/{n}); resolved when its Holm-adjusted p ≤ {alpha:g}. "
                  "\"alone only\": its own CI excludes 0, but not once the other comparisons are counted. MDE = the "
                  f"smallest difference this many prompts detects with 80% power ({pool['mde_factor']} SE).\n",
                  *_decided_note(pool), _table(rows, ["gold_diff", "95% CI", "p", "Holm p", "resolved", "mde", "decided by"])]
    else:
        rows = {k.replace("-vs-", " vs "): v | {"95% CI": _ci(v["ci"]), "resolved": "yes" if v["resolved"] else "not resolved",
                                                "decided by": v.get("decided_by", "pool")}
                for k, v in pool["paired"].items()}
        lines += [f"Expected {gold} of each policy, {where}; Δ = {ref} − the other, 95% percentile bootstrap CI over prompts; resolved = the CI "
                  f"excludes 0, per comparison: no correction for the {len(rows)} comparisons made together "
                  f"(`stages.analysis.pool_family` adds Holm's). MDE = the smallest difference this many prompts "
                  f"detects with 80% power ({pool['mde_factor']} SE).\n",
                  *_decided_note(pool), _table(rows, ["gold_diff", "95% CI", "resolved", "mde", "decided by"])]
    claims = []
    dpo = pool["paired"].get(f"{ref}-vs-dpo")
    if ref == "vcb" and dpo:
        claims.append(f"- VCB ≥ DPO on the {gold}: " + _verdict(dpo["gold_diff"], dpo["ci"], "VCB scores higher",
                                                                "DPO scores higher") + _family_note(pool, f"{ref}-vs-dpo"))
        if "misalignment_diff" in dpo:
            claims.append("- VCB's misalignment rate < DPO's (A.5, on the pool, under the reward model): " + _verdict(
                -dpo["misalignment_diff"], [-dpo["misalignment_ci"][1], -dpo["misalignment_ci"][0]] if dpo["misalignment_ci"]
                else None, "VCB misaligns less", "VCB misaligns more"))
    vcb = pool["methods"].get("vcb")
    if vcb and vcb.get("slope") is not None and vcb.get("slope_ci"):
        lo, hi = vcb["slope_ci"]
        where = "includes 1: consistent with Eq. 12's optimum" if lo <= 1 <= hi else "excludes 1: not at Eq. 12's optimum"
        claims.append(f"- VCB's calibration slope near 1 (Eq. 12): slope {vcb['slope']:.3f}, 95% CI {_ci(vcb['slope_ci'])}, "
                      f"which {where} (R² {vcb['r2']:.3f})" if vcb.get("r2") is not None else
                      f"- VCB's calibration slope: {vcb['slope']:.3f}, 95% CI {_ci(vcb['slope_ci'])} ({where})")
    if claims:
        lines += ["### The paper's claims, as this run measured them\n", *claims, ""]
    power = {k.replace("-vs-", " vs "): {f"{g['prompts']}×{g['candidates']}": g["half_width"] for g in v["power"]["grid"]}
             for k, v in pool["paired"].items() if v.get("power")}
    if power:
        cols = list(next(iter(power.values())))
        lines += ["### What a bigger pool would buy: 95% CI half-width of Δ by prompts × candidates\n",
                  f"{P}×{m} is this pool; more prompts are exact (prompts are independent: half-width ∝ 1/√prompts); "
                  "more candidates are predicted from the variance measured on subsets of this pool's candidates "
                  "(`metrics.power_curve`). A comparison resolves once its half-width falls below |Δ|.\n",
                  _table(power, cols, "{:.4f}")]
    per = {name: v | {"gold CI": _ci(v["gold_ci"]), "slope CI": _ci(v["slope_ci"]),
                      "ESS": f"{v['ess_mean']:.1f}" + (" (pool not valid)" if not v.get("validity", {"valid": True})["valid"]
                                                       else ""),
                      "misaligned": "reference" if name == "sft" else v["misalignment_rate"]}
           for name, v in pool["methods"].items()}
    lines += [f"### Per policy on the pool ({gold}; slope of γ·log-ratio gaps on normalised reward-model gaps)\n",
              _table(per, ["gold", "gold CI", "rm", "ESS", "slope", "slope CI", "r2", "spearman", "misaligned"])]
    lines += validity_section(pool)
    spread = pool.get("seeds")
    if spread:
        rows = {k.replace("-vs-", " vs "): v | {"95% t CI (seeds)": _ci(v["ci_seeds"]), "per seed": ", ".join(f"{d:+.3f}" for d in v["diffs"])}
                for k, v in spread["paired"].items()}
        lines += [f"### Training-seed variance (seeds {spread['seeds']})\n",
                  "Each method trained once per seed on the same D_t; Δ per seed on the same pool. SD across seeds is the "
                  "spread the training seed adds; SE over prompts is what a single seed's CI above reflects.\n",
                  _table(rows, ["per seed", "mean", "sd_seeds", "95% t CI (seeds)", "se_prompts"])]
        for name, v in spread["paired"].items():
            if v["sd_seeds"] is not None and v["se_prompts"]:
                lines.append(f"- {name}: the training seed's SD is {v['sd_seeds'] / v['se_prompts']:.1f}× the prompts' SE"
                             + (" — the seed dominates: read the across-seed interval." if v["sd_seeds"] > v["se_prompts"] else
                                " — the prompts dominate: read the bootstrap CI over prompts (the across-seed interval "
                                "holds the pool's prompts fixed)."))
        lines.append("")
    dt = metrics.get("dt_reward")
    if dt:
        acc = f"held-out pair accuracy {dt['heldout_accuracy']:.3f} on {dt['heldout_pairs']} pairs" \
            if dt.get("heldout_accuracy") is not None else "no held-out accuracy"
        rho = f"Spearman ρ with the {gold} on D_t {dt['spearman_gold_on_dt']:.3f}" \
            if dt.get("spearman_gold_on_dt") is not None else "no gold reward to compare with on D_t"
        if dt["name"] == "gold":
            lines.append(f"**What scored D_t:** the {gold} itself (`rewards.reward_model: gold`): every method calibrates "
                         "to the reward it is evaluated with, an oracle-reward setting. The paper scores D_t with a learned "
                         "reward model (`rewards.reward_model: learned`, Eq. 18), whose errors this run does not include.\n")
        else:
            lines.append(f"**What scored D_t:** the `{dt['name']}` reward ({acc}; {rho}).\n")
    return lines


def judge_notes(about: dict) -> list[str]:
    """What judged (``metrics["judge"]``), and a warning when it is a weak judge."""
    if not about.get("model"):
        return []
    if about.get("endpoint") == "local":
        timing = f"up in {about['start_seconds']:.0f} s" if about.get("start_seconds") is not None else ""
        if about.get("seconds"):
            timing += f"; {about.get('requests', 0)} requests in {about['seconds']:.0f} s"
        lines = [f"Judge: `{about['model']}`, served by vLLM's OpenAI-compatible server, started on 127.0.0.1 for this "
                 f"run ({timing}); replies constrained to the A.3 answer format (`Reason: ...` / `Result: A|B|C`).\n"]
    else:
        lines = [f"Judge: `{about['model']}` at {about.get('endpoint')}.\n"]
    if about["model"] in WEAK_JUDGES:
        lines.append(f"**A weak judge:** `{about['model']}` (135M parameters) on this CPU shows that the judge path is real "
                     "(a server, the A.3 prompts in both orders, the verdicts parsed), not which method is better: read its "
                     "position-bias check below before its win rates. With a GPU, name a strong model in "
                     "`evaluation.judge_model` (a folder or a hub id); nothing else changes.\n")
    return lines


def compute_section(cfg, reward_kl: dict) -> list[str]:
    """Each trained policy's reward and KL beside what it cost (``03_train/metrics.json``'s
    ``compute``): offline methods train on D_t (candidates drawn once from π_sft, shared by all of
    them), the on-policy ones draw their own samples from the policy being trained, every round."""
    path = cfg.run_dir / "03_train" / "metrics.json"
    if not path.is_file():
        return []
    import json

    trained = {m: v["compute"] for m, v in json.loads(path.read_text()).items() if "compute" in v and m in reward_kl}
    if not trained:
        return []
    rows = {m: {"reward": reward_kl[m]["reward"], "kl": reward_kl[m]["kl"], "trains on": "own samples (online)"
                if c["policy_samples"] else "D_t (offline)", "policy samples": f"{c['policy_samples']:,}",
                "π_sft samples (D_t)": f"{c['sft_samples']:,}", "optimizer steps": f"{c['optimizer_steps']:,}",
                "tokens trained": f"{c['tokens_trained']:,}" if c["tokens_trained"] is not None else "–"}
            for m, c in trained.items()}
    return ["Reward and KL beside the compute each policy used (policy samples = responses drawn from the policy "
            "being trained; D_t's candidates are drawn once from π_sft and shared by every offline method; tokens "
            "trained = prompt + response tokens through the forward and backward passes):\n",
            _table(rows, ["trains on", "reward", "kl", "policy samples", "π_sft samples (D_t)", "optimizer steps",
                          "tokens trained"])]


EQ12_REACHED = 0.1  # VCB "reaches Eq. 15" on a set of pairs when its Eq. 12 residual is below this share of π_sft's


def exact_sections(metrics: dict, rel) -> list[str]:
    """The exact tier (``metrics["exact"]``, every response enumerated): what the run measured, in
    sentences written from its numbers: whether VCB reaches Eq. 15 on its candidates (and beyond
    them), how far each method is from π_opt at matched KL, where the mass of the responses D_t never
    sampled goes, and the Figure 1 near-tie in each trained model."""
    ex = metrics.get("exact")
    if not ex:
        return []
    train, test, dt, V, L = ex["train"], ex["test"], ex["dt"], len(ex["vocabulary"]), ex["length"]
    methods = [m for m in ex.get("policies", train) if m not in ("sft", "opt")]
    lines = [f"## Exact tier: every response enumerated ({V}^{L} = {ex['responses_per_prompt']:,} per prompt)\n",
             f"Every number in this section is exact (a sum over all responses, no sampling error, no CI): "
             f"{ex['prompts']['train']} train prompts (D_t's: {dt['candidates_per_prompt']} candidates each, "
             f"{dt['distinct_per_prompt']:.1f} distinct) and {ex['prompts']['test']} test prompts. π_opt is Eq. 15, "
             f"π_sft·e^(r/(γσ_r))/Z at γ = {ex['gamma']:g} with σ_r the exact reward std under π_sft, computed by "
             "Theorem 1 (`theory.optimal_log_policy`); the frontier is Eq. 2's optimum π_sft·e^(r/α)/Z for every α. "
             f"π_sft was fitted by the SFT stage to the task's known target: KL(π_target ‖ π_sft) = "
             f"{train['sft']['fit_kl_target']:.3f} nats on the train prompts, {test['sft']['fit_kl_target']:.3f} on the "
             f"test prompts. log π_sft of D_t's candidates as stage 02 stored it and as the enumeration computes it "
             f"differ by at most {dt['ref_logp_max_error']:.1e}.\n"]
    if "vcb" in train:
        v, sft = train["vcb"], train["sft"]
        reached = v["eq12_rms_candidates"] < EQ12_REACHED * sft["eq12_rms_candidates"]
        beyond = v["eq12_rms_all"] < EQ12_REACHED * sft["eq12_rms_all"]
        lines.append(
            f"**Does VCB reach Eq. 15 on its candidates?** {'Yes' if reached else 'No'}: the root mean square of Eq. 12's "
            f"residual (Δ_i − Δ_j) − (r_i − r_j)/(γσ_r) over D_t's candidate pairs is {v['eq12_rms_candidates']:.3f} "
            f"(π_sft: {sft['eq12_rms_candidates']:.3f}; reached = below {EQ12_REACHED:g}× π_sft's). Over all pairs of "
            f"all {ex['responses_per_prompt']:,} responses it is {v['eq12_rms_all']:.3f} (π_sft: {sft['eq12_rms_all']:.3f}), "
            f"over pairs drawn from π_sft {v['eq12_rms_sft_pairs']:.3f} (π_sft: {sft['eq12_rms_sft_pairs']:.3f}): "
            + ("the calibration extends to the responses D_t never sampled." if beyond else
               "the calibration holds where the loss saw pairs, not on the responses D_t never sampled.")
            + f" Its KL to π_opt is {v['kl_to_opt']:.3f} nats on the train prompts and {test['vcb']['kl_to_opt']:.3f} "
            "on the test prompts.\n")
    rows = {}
    for split, table in (("train", train), ("test", test)):
        for m in ["sft", *methods, "opt"]:
            t = table[m]
            rows[f"{m} ({split})"] = t | {
                "KL to frontier": "beyond its reach" if t["kl_to_frontier"] is None else t["kl_to_frontier"],
                "misaligned": "reference" if m == "sft" else t["misalignment_rate"]}
    lines += ["### Each method against the optimum at its own KL\n",
              "frontier reward = E[r] of Eq. 2's optimum with the method's KL; regret = that minus the method's E[r]; "
              "KL to frontier = KL(π ‖ that optimum); kl_to_opt = KL(π ‖ Eq. 15's optimum at the run's γ); "
              "misaligned = App. A.5 over every pair of responses.\n",
              _table(rows, ["reward", "kl", "frontier_reward", "regret", "KL to frontier", "kl_to_opt", "misaligned"])]
    if methods:
        closest = min(methods, key=lambda m: train[m]["kl_to_opt"])
        lines.append(f"Closest to π_opt on D_t's prompts: **{closest}** (KL {train[closest]['kl_to_opt']:.3f}); then "
                     + ", ".join(f"{m} {train[m]['kl_to_opt']:.3f}" for m in sorted(methods, key=lambda m: train[m]["kl_to_opt"])
                                 if m != closest) + ".\n")
    out = {m: train[m]["outside_dt"] for m in ["sft", *methods, "opt"]}
    lines += ["### Where the mass of the responses D_t never sampled goes\n",
              "mass = Σ π over the responses outside x's candidates; reward = E_π[r | outside]; better_mass = the mass on "
              "outside responses whose reward beats every candidate of x (means over D_t's prompts).\n",
              _table(out, ["mass", "reward", "better_mass"])]
    s0 = out["sft"]
    moves = "; ".join(f"{m} keeps {o['mass']:.3f} there (reward {o['reward']:.2f}, better {o['better_mass']:.3f})"
                      for m, o in out.items() if m != "sft")
    lines.append(f"π_sft puts {s0['sft_mass']:.3f} of its mass outside D_t (mean reward {s0['sft_reward']:.2f}, "
                 f"{s0['sft_better_mass']:.3f} on responses better than every candidate); {moves}.\n")
    nt = {m: train[m]["near_tie"] for m in ["sft", *methods, "opt"]}
    first = nt["sft"]
    lines += [f"### Figure 1 in the trained models: the near-tie y★ (r = {first['r_best']:.2f}) vs y☆ "
              f"(r = {first['r_second']:.2f})\n",
              "Each prompt's best response y★ and its best sibling y☆ (the same first tokens, the other good ending); "
              "last_* = π of the last token after their shared prefix; gap = Δ★ − Δ☆, whose Eq. 12 value is "
              f"(r★ − r☆)/(γσ_r) = {first['target_gap']:.3f} on average; 'both in D_t' = the {first['prompts_both_in_dt']} "
              "prompts whose candidates hold both.\n",
              _table({m: t | {"gap (both in D_t)": "–" if t["gap_both_in_dt"] is None else t["gap_both_in_dt"]}
                      for m, t in nt.items()}, ["last_best", "last_second", "last_other", "gap", "gap (both in D_t)"])]
    if methods and first["target_gap"] > 0:
        lines.append("Near-tie gap over Eq. 12's value: " + ", ".join(f"{m} {nt[m]['gap'] / first['target_gap']:.1f}×"
                                                                      for m in methods)
                     + f" (π_opt {nt['opt']['gap'] / first['target_gap']:.1f}×). π_sft prefers y☆ "
                     f"({first['last_second']:.2f} vs {first['last_best']:.2f} for y★). A gap far above 1× turns a 0.05 reward "
                     "difference into a large probability ratio, what Figure 1 says the order-based losses do.\n"
                     if first["last_second"] > first["last_best"] else ".\n")
    lines += [f"![near-tie]({rel('exact_near_tie.png')})\n", f"![exact reward vs KL]({rel('exact_reward_vs_kl.png')})\n"]
    return lines


def _marked_markdown(example: dict) -> str:
    """A response's tokens with the ones CUT marked in bold (one line, markdown specials escaped)."""
    out = []
    for token, marked in zip(example["tokens"], example["marked"]):
        text = token.replace("\n", " ")
        for ch in "\\*_|`<>[]":
            text = text.replace(ch, "\\" + ch)
        core = text.strip()
        out.append(text.replace(core, f"**{core}**", 1) if marked and core else text)
    return "".join(out).strip() or "(empty)"


def cut_section(cfg, metrics: dict, marks: dict | None) -> list[str]:
    """CUT (judgments, arXiv 2312.14591) beside the methods that read reward values: its paired pool
    difference with the reference method, what its judgments said of D_t, and which tokens its rule
    marks (``marks``: ``stages.analysis.cut_marks``)."""
    if "cut" not in metrics.get("reward_kl", {}):
        return []
    t = cfg.training
    context = "the instruction alone" if t.cut_positive == "none" else "the instruction with the positive judgment"
    lines = ["## Judgments vs reward values: CUT (arXiv 2312.14591)\n",
             f"CUT trains on the same D_t with the same budget, but instead of each candidate's reward value it reads a "
             f"natural-language judgment written from the {cfg.rewards.task if not cfg.data.own else 'your'} task's white-box features "
             "(`vcb_lib/judgments.yaml`): Align-P (MLE of positively judged candidates), Align-N (MLE of a negatively "
             "judged one given its judgment) and Misalign (the same response without it: tokens whose probability "
             f"the judgment raises by more than λ = {t.cut_lambda:g} get the unlikelihood term, α = {t.cut_alpha:g}). "
             f"Positive context: {context}. Evaluated like every policy, with the plain instruction template "
             "(the paper's inference setting).\n"]
    pool = metrics.get("pool") or {}
    ref = pool.get("reference")
    d = (pool.get("paired") or {}).get(f"{ref}-vs-cut")
    if d:
        lines.append(f"- **Judgments vs reward values on the pool** ({pool['gold_name']}): {ref} − cut = "
                     f"{d['gold_diff']:+.3f}, 95% CI {_ci(d['ci'])}: "
                     + ("resolved, " + (f"{ref} (reward values) ahead" if d["ci"][0] > 0 else "CUT (judgments) ahead")
                        if d["resolved"] else f"not resolved at this scale (MDE {d['mde']:.3f})")
                     + _family_note(pool, f"{ref}-vs-cut") + ".")
    if marks:
        s = marks["summary"]
        pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        lines.append(f"- **Judgments on D_t:** {pct(s['negative_share'])} of its {s['judged_candidates']} candidates "
                     "judged negative (Align-N + Misalign), the rest positive (Align-P).")
        lines.append(f"- **Tokens marked** (under the {'trained CUT policy' if s['policy'] == 'cut' else 'π_sft'}, "
                     f"{s['candidates']} negative candidates, {s['tokens']} tokens): {pct(s['marked_share'])} marked. "
                     f"Of the marked tokens {pct(s['marked_that_are_evidence'])} are evidence the judgment quotes "
                     f"(base rate {pct(s['evidence_share'])} of all tokens); {pct(s['evidence_marked'])} of the evidence "
                     "is marked.\n")
        if marks["per_feature"]:
            lines += ["Share of tokens marked, by the feature that failed (a candidate counts under each of its failed features):\n",
                      _table({k: {"candidates": str(v["candidates"]), "tokens": str(v["tokens"]), "marked_share": v["marked_share"]}
                              for k, v in marks["per_feature"].items()}, ["candidates", "tokens", "marked_share"],
                             label="failed feature")]
        for ex in marks["examples"][:3]:
            lines.append(f"> *{ex['prompt']}* — {ex['judgment']}\n>\n> {_marked_markdown(ex)}\n")
    return lines


def data_section(cfg, evaluation_reward: str) -> list[str]:
    """Your own data (``data:``): where the prompts and candidates came from and which rewards scored them."""
    if not cfg.data.own:
        return []
    from vcb_lib.data import task_of
    from vcb_lib.export import reward_source

    d = cfg.data
    prompts = f"prompts from `{d.prompts}` (column `{d.prompt_column}`)" if d.prompts else \
        f"the prompts of the candidate file (column `{d.prompt_column}`)"
    split = f"split by column `{d.split_column}`" if d.split_column else \
        f"split by the rule ({d.test_percent}% test by a hash of data.split_seed {d.split_seed} and the prompt id)"
    dt = f"D_t imported from `{d.candidates}`" if d.candidates else "D_t sampled from π_sft"
    return [f"**Your data:** task `{task_of(cfg).name}`: {prompts}, {split}; {dt}, scored by {reward_source(cfg)}; "
            f"evaluation reward: {evaluation_reward}.\n"]


def write_report(cfg, metrics: dict, fig_dir: Path, *, cut: dict | None = None) -> Path:
    """``<run>/report.md``: the scale of the run, then Tables 2, 4, 5, 6, 7 and Figs. 5, 8 as this
    run measured them (figures linked from ``fig_dir``); ``cut``: ``stages.analysis.cut_marks``' result,
    for the CUT section."""
    if (metrics.get("pool") or {}).get("paired") and "family" not in metrics["pool"]:  # notebook 05's analysis.run adds it
        from vcb_lib.stages.analysis import pool_family

        metrics = metrics | {"pool": metrics["pool"] | {"family": pool_family(cfg, metrics)}}
    s, rel = metrics["scale"], lambda name: Path(fig_dir.name) / name
    ref, reward = metrics["reference"], metrics.get("evaluation_reward_name", metrics["evaluation_reward"])
    wr = {f"{ref} vs {m}": v | {"95% CI": f"[{v['win_rate_ci'][0]:.2f}, {v['win_rate_ci'][1]:.2f}]",
                                "MDE": MDE_FACTOR * v["win_rate_se"] if v.get("win_rate_se") is not None else None}
          for m, v in metrics["win_rate"].items()}
    lines = [
        f"# Run `{cfg.run.name}`: {', '.join(cfg.training.methods)} against π_sft\n",
        f"**Scale, honestly:** policy `{s['policy']}` on task `{s['task']}`, {s['prompts']} test prompts × "
        f"{s['samples_per_prompt']} samples per policy, seed {s['seed']}; evaluation reward: {reward}. "
        "The paper uses Pythia-2.8B, thousands of prompts and GPT-4/human judges: compare directions and confidence "
        "intervals, not magnitudes.\n",
        *data_section(cfg, reward),
        *pool_sections(metrics),
        *exact_sections(metrics, rel),
        f"## Table 2 analogue: win rate of {ref} ({reward})\n",
        "Sampled: every policy draws from the same prompts with the same seeds. MDE = the smallest win-rate "
        f"departure from its value that these prompts detect with 80% power ({MDE_FACTOR} bootstrap SE).\n",
        _table(wr, ["win", "tie", "lose", "win_rate", "95% CI", "MDE"]),
        f"![win rates]({rel('table2_win_rates.png')})\n",
    ]
    if metrics.get("ood_win_rate"):
        ood = {f"{ref} vs {m}": v for m, v in metrics["ood_win_rate"].items()}
        lines += ["## Table 5 analogue: out-of-distribution prompts\n", _table(ood, ["win", "tie", "lose", "win_rate"])]
    if (metrics.get("rm_accuracy") or {}).get("accuracy") is not None:
        lines += ["## Table 4 analogue: reward model accuracy (held-out pairs)\n",
                  _table({f"{cfg.rewards.reward_model} RM ({cfg.rewards.rm_backbone})" if cfg.rewards.reward_model == "learned"
                else f"{cfg.rewards.reward_model} RM": metrics["rm_accuracy"]}, ["accuracy", "heldout_pairs", "spearman_gold"])]
        if cfg.rewards.reward_model == "gold":
            lines.append("The gold reward scored D_t here (`rewards.reward_model: gold`): its accuracy on gold-labelled "
                         "pairs is 1 by construction; `reward_model: learned` trains the Bradley-Terry model of Eq. 18.\n")
    elif cfg.rewards.reward_model == "gold":
        lines += ["## Table 4 analogue: no reward model was trained\n",
                  "The gold reward scored D_t (`rewards.reward_model: gold`), so no Bradley-Terry model was needed; "
                  "`rewards.reward_model: learned` trains the paper's (Eq. 18) and this table then shows its accuracy.\n"]
    if metrics.get("judge_win_rate"):
        judge = {f"{ref} vs {m}": v | {k: str(v[k]) for k in ("n_judged", "n_excluded") if k in v}  # counts, not rates
                 for m, v in metrics["judge_win_rate"].items()}
        lines += ["## Fig. 4 analogue: LLM judge (A.3 prompts, both orders)\n", *judge_notes(metrics.get("judge") or {}),
                  _table(judge, ["win", "tie", "lose", "win_rate", "n_judged", "n_excluded", "consistent", "same_position",
                                 "picks_a"]),
                  "Rates over the `n_judged` prompts whose replies in both orders gave a verdict; a prompt with a reply "
                  "that has none (malformed) is excluded, counted in `n_excluded`, never scored as a tie (which would pull "
                  "the win rate towards 0.5).\n",
                  "Position-bias check: every pair is judged twice, the responses swapped; a verdict that swaps with them "
                  "is `consistent`, one that names the same position both times (A, A or B, B) is `same_position` and "
                  "scores as a tie; `picks_a` = share of A among all A/B verdicts. An unbiased judge has `same_position` "
                  "near 0 and `picks_a` near 0.5.\n"]
    curve = {f"{m} @ step {p['step']}": p for m, points in (metrics.get("reward_kl_curve") or {}).items() for p in points}
    lines += ["## Fig. 5: reward vs KL\n", _table(metrics["reward_kl"], ["reward", "reward_se", "kl", "kl_se"])]
    if curve:
        lines += ["Along training (first evaluation prompts; step 0 = π_sft):\n", _table(curve, ["reward", "reward_se", "kl", "kl_se"])]
    lines += compute_section(cfg, metrics["reward_kl"])
    lines += [f"![reward vs KL]({rel('fig5_reward_vs_kl.png')})\n",
              "## Table 6: misalignment rate (A.5)\n",
              _table({m: {"misalignment": "reference" if v is None else v} for m, v in metrics["misalignment_rate"].items()},
                     ["misalignment"]),
              "## Table 7: diversity (A.8)\n", _table(metrics["diversity"], ["ead", "self_bleu_2", "self_bleu_3"]),
              "## Fig. 8: output length (A.7)\n", _table(metrics["length"], ["mean", "median", "q1", "q3"]),
              f"![lengths]({rel('fig8_lengths.png')})\n"]
    lines += cut_section(cfg, metrics, cut)
    path = cfg.run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


ABLATION_HEADING = "## Figs. 6-7 analogues: hyper-parameter ablations (A.6)"


def _pm(value, se) -> str:
    """``0.123 ± 0.045``; "–" for a missing value (NaN in a results.csv), no ± for a missing SE."""
    if value is None or value != value:
        return "–"
    return f"{value:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def reward_kl_points(table: pd.DataFrame) -> list[str]:
    """One sweep's points side by side on reward vs KL (Fig. 5's axes): per point the method it
    trained, its mean evaluation reward and KL(π‖π_sft) on the test prompts (± SE over prompts),
    the reward gained over π_sft's samples on the same prompts, and that gain per nat of KL."""
    rows = {}
    for r in table.to_dict(orient="records"):
        sft = r.get("sft_reward")
        gain = r["reward"] - sft if sft is not None and sft == sft else None  # sft == sft: not NaN
        per_nat = gain / r["kl"] if gain is not None and r["kl"] == r["kl"] and r["kl"] > 0 else None
        rows[str(r["label"])] = {"trains": r["method"], "reward ± SE": _pm(r["reward"], r.get("reward_se")),
                                 "KL ± SE (nats)": _pm(r["kl"], r.get("kl_se")), "reward gain over π_sft": gain,
                                 "gain per nat": per_nat if per_nat is not None else "–"}
    sft = table["sft_reward"].dropna()
    head = "Reward vs KL, the points side by side" + (f" (π_sft: reward {sft.iloc[0]:.3f}, KL 0)" if len(sft) else "")
    return [f"{head}:\n", _table(rows, ["trains", "reward ± SE", "KL ± SE (nats)", "reward gain over π_sft", "gain per nat"])]


def _num(value) -> bool:
    return value is not None and value == value  # not None, not NaN (a results.csv gap)


def _false(value) -> bool:
    """An explicit False (numpy's too), not a results.csv gap."""
    return _num(value) and not bool(value)


def pool_points(table: pd.DataFrame) -> list[str]:
    """One sweep's points on the shared held-out pool: per point its expected evaluation reward,
    its difference with π_sft and with the sweep's first point (paired over prompts; 95% bootstrap
    CIs; resolved per comparison, and whether it stays resolved family-wise, Bonferroni over the
    points compared), Eq. 12's slope and the misalignment rate. A point scored on a pool of its own
    (``shared_pool`` False: the upstream folder was busy; older tables: ``same_pool`` False) is marked
    † and footnoted: its comparisons pair prompts only, and their CIs are wider. [] when the rows
    have no pool."""
    if "pool_gold" not in table or not table["pool_gold"].map(_num).any():
        return []
    records = table.to_dict(orient="records")
    first = str(records[0]["label"])

    def ci(r, key) -> str:
        lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
        return f"{r[key]:+.3f} [{lo:.3f}, {hi:.3f}]" if _num(r.get(key)) and _num(lo) and _num(hi) else "–"

    def verdict(r) -> str:
        if not _num(r.get("vs_first")):
            return "(reference)" if r is records[0] else "no comparison"
        if not r.get("vs_first_resolved"):
            return "not resolved"
        return "resolved" if r.get("vs_first_resolved_all") else "resolved alone, not family-wise"

    own = [r for r in records if _false(r.get("shared_pool")) or ("shared_pool" not in r and _false(r.get("same_pool")))]
    mark = lambda r: " †" if any(r is o for o in own) else ""  # noqa: E731
    rows = {str(r["label"]) + mark(r): {"trains": r["method"], "pool reward [95% CI]": ci(r, "pool_gold").lstrip("+"),
                              "Δ vs π_sft [95% CI]": ci(r, "pool_vs_sft"), f"Δ vs {first} [95% CI]": ci(r, "vs_first"),
                              "verdict": verdict(r), "Eq. 12 slope": r.get("slope") if _num(r.get("slope")) else "–",
                              "misalignment": r.get("misalignment") if _num(r.get("misalignment")) else "–"}
            for r in records}
    compared = sum(_num(r.get("vs_first")) for r in records)
    shared = not own and all(bool(r.get("same_pool")) for r in records[1:] if _num(r.get("vs_first")))
    lines = [f"On the held-out pool ({'every point scored on the same π_sft candidates' if shared else 'paired over prompts'}; "
             f"Δ paired over prompts, 95% bootstrap CIs; family-wise: Bonferroni over the {compared} comparisons "
             f"with {first}):\n",
             _table(rows, ["trains", "pool reward [95% CI]", "Δ vs π_sft [95% CI]", f"Δ vs {first} [95% CI]", "verdict",
                           "Eq. 12 slope", "misalignment"], label="point")]
    if own:
        lines.append(f"† scored on a pool of its own, not the upstream's shared one (the upstream folder was busy, being "
                     f"written by another process, when it ran): {', '.join(str(r['label']) for r in own)}. Its Δ with "
                     f"the other points pairs prompts only, not candidates, so its CI is wider than on the shared pool.\n")
    return lines


def add_ablations_to_report(cfg, tables: dict[str, pd.DataFrame], fig_path: Path) -> Path:
    """Append (or replace) the ablation section of ``<run>/report.md``: per sweep its win-rate table,
    its reward-vs-KL points side by side (:func:`reward_kl_points`) and its points on the held-out
    pool, each against π_sft and the first point (:func:`pool_points`), then the figure. Notebook
    05 writes the rest of the report."""
    path = cfg.run_dir / "report.md"
    text = path.read_text() if path.is_file() else f"# Run `{cfg.run.name}`\n"
    text = text.split("\n" + ABLATION_HEADING)[0].rstrip("\n") + "\n"
    lines = ["", ABLATION_HEADING, "",
             "Win rate of the swept method over π_sft on the test prompts under the evaluation reward, "
             "95% bootstrap interval.\n"]
    for title, table in tables.items():
        rows = {str(r["label"]): r | {"95% CI": f"[{r['win_rate_lo']:.2f}, {r['win_rate_hi']:.2f}]"}
                for r in table.to_dict(orient="records")}
        lines += [f"### {title}\n", _table(rows, ["win", "tie", "lose", "win_rate", "95% CI", "reward", "kl"]),
                  *reward_kl_points(table), *pool_points(table)]
    lines.append(f"![ablations]({Path(fig_path).parent.name}/{Path(fig_path).name})\n")
    atomic_write_text(path, text + "\n".join(lines))
    return path
