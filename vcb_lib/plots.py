"""Seaborn figures of the paper's artefacts, one function per figure. Each takes the data it
draws (``04_eval/metrics.json`` sections or the samples table), saves a PNG when ``path`` is
given, and returns the matplotlib Figure (shown inline in a notebook)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "module://ipykernel")):
    matplotlib.use("Agg")  # headless outside a kernel
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(fig, path: str | Path | None):
    if path is not None:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    return fig


def win_rates(win_rate: dict, path=None, *, title: str = "VCB vs baselines under the gold reward (Table 2)"):
    """Stacked win / tie / lose bars of VCB against each baseline, with the bootstrap CI of the
    win rate (``metrics["win_rate"]``: ``{baseline: {win, tie, lose, win_rate, ci}}``)."""
    df = pd.DataFrame(win_rate).T[["win", "tie", "lose"]].astype(float)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(df) + 1.2))
    left = pd.Series(0.0, index=df.index)
    for col, color in zip(("win", "tie", "lose"), sns.color_palette("RdYlGn_r", 3)):
        ax.barh([f"VCB vs {b}" for b in df.index], df[col], left=left, color=color, label=col)
        left += df[col]
    for i, b in enumerate(df.index):
        lo, hi = win_rate[b]["win_rate_ci"]
        ax.plot([lo, hi], [i, i], color="k", lw=1.5)
    ax.axvline(0.5, color="k", ls=":", lw=0.8)
    ax.set(xlim=(0, 1), xlabel="share of test prompts (black: 95% CI of the win rate)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reward_vs_kl(reward_kl: dict, path=None, *, curve: dict | None = None):
    """Fig. 5: mean reward against KL(π‖π_sft), ± one standard error. Points: each final policy
    on the evaluation prompts (``metrics["reward_kl"]``); lines (when ``curve`` =
    ``metrics["reward_kl_curve"]`` is given): each method's snapshots along training, from step 0
    (π_sft, KL 0) on, on the first ``evaluation.curve_prompts`` prompts."""
    df = pd.DataFrame(reward_kl).T.reset_index(names="method")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    palette = dict(zip(df.method, sns.color_palette(n_colors=len(df))))
    ax.errorbar(df.kl, df.reward, xerr=df.kl_se, yerr=df.reward_se, fmt="none", ecolor="grey", lw=0.8)
    sns.scatterplot(data=df, x="kl", y="reward", hue="method", palette=palette, s=60, ax=ax)
    for method, points in (curve or {}).items():
        c = pd.DataFrame(points)
        ax.plot(c.kl, c.reward, "-", marker=".", color=palette.get(method, "k"), lw=1, alpha=0.7)
    ax.set(xlabel="KL(π ‖ π_sft) per sequence (nats)", ylabel="mean gold reward", title="Reward vs KL (Fig. 5)")
    if curve:
        ax.text(0.01, 0.01, "big dots: final policies, all evaluation prompts\nlines: π_sft → snapshots → final, "
                "on the first evaluation.curve_prompts prompts", transform=ax.transAxes, fontsize=7, va="bottom")
    return _save(fig, path)


def lengths(samples: pd.DataFrame, path=None):
    """Fig. 8: response length distributions per method (tokens)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.boxplot(data=samples, x="method", y="n_tokens", ax=ax)
    ax.set(xlabel="", ylabel="response tokens", title="Output length (Fig. 8)")
    return _save(fig, path)


def metric_bars(values: dict, path=None, *, ylabel: str, title: str):
    """One bar per method (misalignment rate of Table 6, Self-BLEU / EAD of Table 7, ...)."""
    df = pd.Series(values, name=ylabel).rename_axis("method").reset_index()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    sns.barplot(data=df, x="method", y=ylabel, ax=ax)
    ax.set(xlabel="", title=title)
    return _save(fig, path)


def _win_rate_axis(ax, table: pd.DataFrame, title: str) -> None:
    x = list(range(len(table)))
    err = [table.win_rate - table.win_rate_lo, table.win_rate_hi - table.win_rate]
    ax.errorbar(x, table.win_rate, yerr=err, fmt="o-", capsize=3, color=sns.color_palette()[0])
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set(xticks=x, ylim=(0, 1), ylabel="win rate over π_sft (95% CI)", title=title)
    ax.set_xticklabels(table.label, rotation=30 if len(x) > 4 else 0, ha="right" if len(x) > 4 else "center")


def sweep_win_rates(tables: dict[str, pd.DataFrame], path=None):
    """Figs. 6-7 (A.6): win rate over π_sft of each sweep point (``sweep.run_sweep`` tables:
    ``label``, ``win_rate``, ``win_rate_lo``, ``win_rate_hi``), one panel per sweep."""
    fig, axes = plt.subplots(1, len(tables), figsize=(3.8 * len(tables), 3.4), squeeze=False)
    for ax, (title, table) in zip(axes[0], tables.items()):
        _win_rate_axis(ax, table, title)
    fig.tight_layout()
    return _save(fig, path)


def ablation_points(table: pd.DataFrame):
    """The widget panel's live plot: win rate over π_sft per finished point, and reward vs KL with
    π_sft at KL 0. Built on a bare ``Figure`` (no pyplot state), so a worker thread may draw it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 3.4))
    a, b = fig.subplots(1, 2)
    _win_rate_axis(a, table, "win rate per point")
    b.errorbar(table.kl, table.reward, xerr=table.kl_se, yerr=table.reward_se, fmt="none", ecolor="grey", lw=0.8)
    sns.scatterplot(data=table, x="kl", y="reward", hue="label", s=50, ax=b)
    b.scatter([0.0], [table.sft_reward.mean()], marker="*", s=120, color="k", label="π_sft")
    b.set(xlabel="KL(π ‖ π_sft) per sequence (nats)", ylabel="mean evaluation reward", title="reward vs KL")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


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
    from vcb_lib.io import atomic_write_text

    s, rel = metrics["scale"], lambda name: Path(fig_dir.name) / name
    wr = {f"VCB vs {m}": v | {"95% CI": f"[{v['win_rate_ci'][0]:.2f}, {v['win_rate_ci'][1]:.2f}]"}
          for m, v in metrics["win_rate"].items()}
    lines = [
        f"# Run `{cfg.run.name}`: VCB and baselines\n",
        f"**Scale, honestly:** policy `{s['policy']}` on task `{s['task']}`, {s['prompts']} test prompts × "
        f"{s['samples_per_prompt']} samples per policy, seed {s['seed']}; evaluation reward: `{metrics['evaluation_reward']}`. "
        "The paper uses Pythia-2.8B, thousands of prompts and GPT-4/human judges: compare directions and confidence "
        "intervals, not magnitudes.\n",
        "## Table 2 analogue: win rate of VCB (gold reward)\n", _table(wr, ["win", "tie", "lose", "win_rate", "95% CI"]),
        f"![win rates]({rel('table2_win_rates.png')})\n",
    ]
    if metrics.get("ood_win_rate"):
        ood = {f"VCB vs {m}": v for m, v in metrics["ood_win_rate"].items()}
        lines += ["## Table 5 analogue: out-of-distribution prompts\n", _table(ood, ["win", "tie", "lose", "win_rate"])]
    if metrics.get("rm_accuracy"):
        lines += ["## Table 4 analogue: reward model accuracy (held-out pairs)\n",
                  _table({f"{cfg.rewards.reward_model} RM ({cfg.rewards.rm_backbone})" if cfg.rewards.reward_model == "learned"
                else f"{cfg.rewards.reward_model} RM": metrics["rm_accuracy"]}, ["accuracy", "heldout_pairs", "spearman_gold"])]
        if cfg.rewards.reward_model == "gold":
            lines.append("The gold reward scored D_t here (`rewards.reward_model: gold`): its accuracy on gold-labelled "
                         "pairs is 1 by construction; `reward_model: learned` trains the Bradley-Terry model of Eq. 18.\n")
    if metrics.get("judge_win_rate"):
        judge = {f"VCB vs {m}": v for m, v in metrics["judge_win_rate"].items()}
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
    from vcb_lib.io import atomic_write_text

    path = cfg.run_dir / "report.md"
    text = path.read_text() if path.is_file() else f"# Run `{cfg.run.name}`\n"
    text = text.split("\n" + ABLATION_HEADING)[0].rstrip("\n") + "\n"
    lines = ["", ABLATION_HEADING, "",
             "Win rate of the swept method over π_sft on the test prompts (gold reward), 95% bootstrap interval.\n"]
    for title, table in tables.items():
        rows = {str(r["label"]): r | {"95% CI": f"[{r['win_rate_lo']:.2f}, {r['win_rate_hi']:.2f}]"}
                for r in table.to_dict(orient="records")}
        lines += [f"### {title}\n", _table(rows, ["win", "tie", "lose", "win_rate", "95% CI", "reward", "kl"])]
    lines.append(f"![ablations]({Path(fig_path).parent.name}/{Path(fig_path).name})\n")
    atomic_write_text(path, text + "\n".join(lines))
    return path
