"""``<run>/report.md``: the run's tables and figures in the paper's layout (notebook 05), and the
ablation section (notebook 06). Every label (the reference method, the evaluation reward) comes
from the run's own metrics."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from vcb_lib.io import atomic_write_text


def _table(rows: dict, columns: list[str], fmt: str = "{:.3f}") -> str:
    head = "| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for method, values in rows.items():
        cells = [fmt.format(values[c]) if isinstance(values.get(c), (int, float)) else str(values.get(c, "")) for c in columns]
        body += f"| {method} | " + " | ".join(cells) + " |\n"
    return head + body


def write_report(cfg, metrics: dict, fig_dir: Path) -> Path:
    """``<run>/report.md``: the scale of the run, then Tables 2, 4, 5, 6, 7 and Figs. 5, 8 as this
    run measured them (figures linked from ``fig_dir``)."""
    s, rel = metrics["scale"], lambda name: Path(fig_dir.name) / name
    ref, reward = metrics["reference"], metrics.get("evaluation_reward_name", metrics["evaluation_reward"])
    wr = {f"{ref} vs {m}": v | {"95% CI": f"[{v['win_rate_ci'][0]:.2f}, {v['win_rate_ci'][1]:.2f}]"}
          for m, v in metrics["win_rate"].items()}
    lines = [
        f"# Run `{cfg.run.name}`: {', '.join(cfg.training.methods)} against π_sft\n",
        f"**Scale, honestly:** policy `{s['policy']}` on task `{s['task']}`, {s['prompts']} test prompts × "
        f"{s['samples_per_prompt']} samples per policy, seed {s['seed']}; evaluation reward: {reward}. "
        "The paper uses Pythia-2.8B, thousands of prompts and GPT-4/human judges: compare directions and confidence "
        "intervals, not magnitudes.\n",
        f"## Table 2 analogue: win rate of {ref} ({reward})\n", _table(wr, ["win", "tie", "lose", "win_rate", "95% CI"]),
        f"![win rates]({rel('table2_win_rates.png')})\n",
    ]
    if metrics.get("ood_win_rate"):
        ood = {f"{ref} vs {m}": v for m, v in metrics["ood_win_rate"].items()}
        lines += ["## Table 5 analogue: out-of-distribution prompts\n", _table(ood, ["win", "tie", "lose", "win_rate"])]
    if metrics.get("rm_accuracy"):
        lines += ["## Table 4 analogue: reward model accuracy (held-out pairs)\n",
                  _table({f"{cfg.rewards.reward_model} RM ({cfg.rewards.rm_backbone})" if cfg.rewards.reward_model == "learned"
                else f"{cfg.rewards.reward_model} RM": metrics["rm_accuracy"]}, ["accuracy", "heldout_pairs", "spearman_gold"])]
        if cfg.rewards.reward_model == "gold":
            lines.append("The gold reward scored D_t here (`rewards.reward_model: gold`): its accuracy on gold-labelled "
                         "pairs is 1 by construction; `reward_model: learned` trains the Bradley-Terry model of Eq. 18.\n")
    if metrics.get("judge_win_rate"):
        judge = {f"{ref} vs {m}": v for m, v in metrics["judge_win_rate"].items()}
        lines += ["## Fig. 4 analogue: LLM judge (A.3 prompts, both orders)\n",
                  _table(judge, ["win", "tie", "lose", "win_rate", "n_malformed"])]
    curve = {f"{m} @ step {p['step']}": p for m, points in (metrics.get("reward_kl_curve") or {}).items() for p in points}
    lines += ["## Fig. 5: reward vs KL\n", _table(metrics["reward_kl"], ["reward", "reward_se", "kl", "kl_se"])]
    if curve:
        lines += ["Along training (first evaluation prompts; step 0 = π_sft):\n", _table(curve, ["reward", "reward_se", "kl", "kl_se"])]
    lines += [f"![reward vs KL]({rel('fig5_reward_vs_kl.png')})\n",
              "## Table 6: misalignment rate (A.5)\n",
              _table({m: {"misalignment": v} for m, v in metrics["misalignment_rate"].items()}, ["misalignment"]),
              "## Table 7: diversity (A.8)\n", _table(metrics["diversity"], ["ead", "self_bleu_2", "self_bleu_3"]),
              "## Fig. 8: output length (A.7)\n", _table(metrics["length"], ["mean", "median", "q1", "q3"]),
              f"![lengths]({rel('fig8_lengths.png')})\n"]
    path = cfg.run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


ABLATION_HEADING = "## Figs. 6-7 analogues: hyper-parameter ablations (A.6)"


def add_ablations_to_report(cfg, tables: dict[str, pd.DataFrame], fig_path: Path) -> Path:
    """Append (or replace) the ablation section of ``<run>/report.md``: one table per sweep and
    the figure. Notebook 05 writes the rest of the report."""
    path = cfg.run_dir / "report.md"
    text = path.read_text() if path.is_file() else f"# Run `{cfg.run.name}`\n"
    text = text.split("\n" + ABLATION_HEADING)[0].rstrip("\n") + "\n"
    lines = ["", ABLATION_HEADING, "",
             "Win rate of the swept method over π_sft on the test prompts under the evaluation reward, "
             "95% bootstrap interval.\n"]
    for title, table in tables.items():
        rows = {str(r["label"]): r | {"95% CI": f"[{r['win_rate_lo']:.2f}, {r['win_rate_hi']:.2f}]"}
                for r in table.to_dict(orient="records")}
        lines += [f"### {title}\n", _table(rows, ["win", "tie", "lose", "win_rate", "95% CI", "reward", "kl"])]
    lines.append(f"![ablations]({Path(fig_path).parent.name}/{Path(fig_path).name})\n")
    atomic_write_text(path, text + "\n".join(lines))
    return path
