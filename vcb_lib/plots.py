"""Seaborn figures of the paper's artefacts, one function per figure. Each takes the data it
draws (``04_eval/metrics.json`` sections or the samples table), saves a PNG when ``path`` is
given, and returns the matplotlib Figure (shown inline in a notebook)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "module://ipykernel")):
    matplotlib.use("Agg")  # headless outside a kernel
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(fig, path: str | Path | None):
    if path is not None:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    return fig


def win_rates(win_rate: dict, path=None, *, reference: str, reward: str, title: str = "Table 2"):
    """Stacked win / tie / lose bars of ``reference`` against each other policy under ``reward``,
    with the bootstrap CI of the win rate (``metrics["win_rate"]``: ``{other: {win, tie, lose,
    win_rate, win_rate_ci}}``; ``reference`` and ``reward`` come from the same metrics)."""
    df = pd.DataFrame(win_rate).T[["win", "tie", "lose"]].astype(float)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(df) + 1.2))
    title = f"{reference} vs the others under the {reward} ({title})"
    left = pd.Series(0.0, index=df.index)
    for col, color in zip(("win", "tie", "lose"), sns.color_palette("RdYlGn_r", 3)):
        ax.barh([f"{reference} vs {b}" for b in df.index], df[col], left=left, color=color, label=col)
        left += df[col]
    for i, b in enumerate(df.index):
        lo, hi = win_rate[b]["win_rate_ci"]
        ax.plot([lo, hi], [i, i], color="k", lw=1.5)
    ax.axvline(0.5, color="k", ls=":", lw=0.8)
    ax.set(xlim=(0, 1), xlabel="share of test prompts (black: 95% CI of the win rate)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reward_vs_kl(reward_kl: dict, path=None, *, reward: str = "evaluation reward", curve: dict | None = None):
    """Fig. 5: mean reward against KL(π‖π_sft), ± one standard error. Points: each final policy
    on the evaluation prompts (``metrics["reward_kl"]``); lines (when ``curve`` =
    ``metrics["reward_kl_curve"]`` is given): each method's snapshots along training, from step 0
    (π_sft, KL 0) on, on the first ``evaluation.curve_prompts`` prompts."""
    from vcb_lib.policy_gradient import is_online

    df = pd.DataFrame(reward_kl).T.reset_index(names="method")
    df["trains on"] = ["own samples" if is_online(m) else "π_sft" if m == "sft" else "D_t" for m in df.method]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    palette = dict(zip(df.method, sns.color_palette(n_colors=len(df))))
    ax.errorbar(df.kl, df.reward, xerr=df.kl_se, yerr=df.reward_se, fmt="none", ecolor="grey", lw=0.8)
    online = df["trains on"].eq("own samples").any()  # on-policy methods: their own marker on the same axes
    sns.scatterplot(data=df, x="kl", y="reward", hue="method", palette=palette, s=60, ax=ax,
                    style="trains on" if online else None)
    for method, points in (curve or {}).items():
        c = pd.DataFrame(points)
        ax.plot(c.kl, c.reward, "-", marker=".", color=palette.get(method, "k"), lw=1, alpha=0.7)
    ax.set(xlabel="KL(π ‖ π_sft) per sequence (nats)", ylabel=f"mean {reward}", title="Reward vs KL (Fig. 5)")
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


def sweep_pool_differences(table: pd.DataFrame, path=None):
    """A sweep's points on the held-out pool (``sweep.run_sweep`` table with the pool columns):
    left, each point's difference with π_sft; right, with the sweep's first point (paired over
    prompts); each with its 95% bootstrap CI, a line at 0, filled where the CI excludes 0."""
    rows = table.iloc[::-1]  # the first point on top
    first = str(table.label.iloc[0])
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 0.35 * len(table) + 1.4), sharey=True)
    for ax, key, title in ((axes[0], "pool_vs_sft", "Δ vs π_sft"), (axes[1], "vs_first", f"Δ vs {first}")):
        y = range(len(rows))
        value, lo, hi = (rows[c].astype(float).to_numpy() for c in (key, f"{key}_lo", f"{key}_hi"))
        ax.errorbar(value, y, xerr=[value - lo, hi - value], fmt="none", ecolor="grey", lw=1)
        shown = np.isfinite(value) & np.isfinite(lo) & np.isfinite(hi)  # the first point has no Δ with itself
        resolved = shown & ((lo > 0) | (hi < 0))
        ax.scatter(value[resolved], np.flatnonzero(resolved), color="C0", zorder=3, label="CI excludes 0")
        ax.scatter(value[shown & ~resolved], np.flatnonzero(shown & ~resolved), facecolor="white", edgecolor="C0",
                   zorder=3, label="not resolved")
        ax.axvline(0, color="k", lw=0.8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.set(title=title, xlabel="expected gold reward difference (pool)")
    axes[0].set_yticks(range(len(rows)), [str(label) for label in rows.label])
    axes[1].legend(fontsize=7, loc="lower right")
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


# Notebooks 01-03: the gold reward's features, the reward model, D_t, training curves


def feature_histograms(features: pd.DataFrame, path=None):
    """One histogram per numeric feature of a white-box gold reward (``GoldReward.features``)."""
    numeric = features.select_dtypes("number").drop(columns=["n_words"], errors="ignore")
    fig, axes = plt.subplots(1, len(numeric.columns), figsize=(2.4 * len(numeric.columns), 2.4), squeeze=False)
    for ax, column in zip(axes[0], numeric.columns):
        sns.histplot(numeric[column], ax=ax, bins=15).set(title=column, xlabel="", ylabel="")
    fig.tight_layout()
    return _save(fig, path)


def rm_vs_gold(scores: dict, spearman: float, path=None):
    """Learned reward model against the gold reward on the held-out responses (Table 4's pairs)."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    sns.scatterplot(data=pd.DataFrame(scores), x="gold", y="learned", ax=ax, s=18)
    ax.set(title=f"learned vs gold reward (Spearman {spearman:.2f})")
    return _save(fig, path)


def candidate_stats(table: pd.DataFrame, path=None):
    """D_t as the calibration losses see it: rewards, σ_r(x) per prompt (Eq. 10), lengths."""
    sigma = table.groupby("prompt_id").reward.std(ddof=0)  # population std, as Eq. 10
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    sns.histplot(table.reward, ax=axes[0]).set(title="reward of the candidates")
    sns.histplot(sigma, ax=axes[1]).set(title="σ_r(x) per prompt (Eq. 10)")
    sns.histplot(table.n_tokens, ax=axes[2]).set(title="response tokens")
    fig.tight_layout()
    return _save(fig, path)


def training_curves(logs: pd.DataFrame, out_dir: Path) -> list:
    """Loss per method (own panel each: scales differ) -> ``loss_curves.png``; where logged, the
    share of preference pairs ordered like the reward model -> ``pair_accuracy.png``."""
    grid = sns.relplot(data=logs, x="step", y="loss", col="method", kind="line", col_wrap=3, height=2.6,
                       facet_kws={"sharey": False})
    grid.savefig(Path(out_dir) / "loss_curves.png", dpi=120)
    figs = [grid.figure]
    if "rewards/accuracies" in logs:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        sns.lineplot(data=logs, x="step", y="rewards/accuracies", hue="method", ax=ax)
        figs.append(_save(fig, Path(out_dir) / "pair_accuracy.png"))
    return figs


# Notebook 00: theory


def theorem1_scatter(t1: dict, path=None):
    """Theorem 1: every probability of every random problem, closed form (Eq. 5) against the
    numerical maximiser of Eq. 3 (``theory.check_theorem1``'s ``closed`` and ``numeric``)."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(t1["closed"].ravel(), t1["numeric"].ravel(), s=14, alpha=0.7)
    ax.axline((1e-3, 1e-3), slope=1, color="k", ls="--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="closed form, Eq. 5", ylabel="numerical maximiser of Eq. 3",
           title="Theorem 1: every probability of every problem")
    return _save(fig, path)


def eq12_proportionality(pair_gaps: dict, path=None):
    """Eq. 12 pair by pair, one panel per fit: scaled reward gap (r_i - r_j)/(γσ_r) against the
    log-ratio gap Δ_i - Δ_j (``{label: theory.pair_gaps(...)}``); VCB's optimum is the diagonal."""
    gaps = pd.concat([pd.DataFrame(g).assign(method=label) for label, g in pair_gaps.items()])
    g = sns.relplot(data=gaps, x="reward_gap", y="log_ratio_gap", col="method", s=14, alpha=0.6, height=3.2,
                    facet_kws={"sharey": False})
    for ax in g.axes.flat:
        ax.axline((0, 0), slope=1, color="k", ls="--", lw=0.8)
        ax.axhline(0, color="grey", lw=0.5)
    g.set_axis_labels("(r_i - r_j) / (gamma sigma_r)", "log-ratio gap  Delta_i - Delta_j")
    return _save(g.figure, path)


def _response_labels(rewards) -> list[str]:
    return [f"y{i + 1} (r={r:g})" for i, r in enumerate(rewards)]


def figure1_table(probs: dict, rewards) -> pd.DataFrame:
    """Figure 1's fitted probabilities (``theory.figure1_example``'s ``probs``): one row per method,
    one column per response, labelled with its reward."""
    return pd.DataFrame(probs, index=_response_labels(rewards)).T


def figure1_bars(probs: dict, rewards, path=None, *, gamma: float, steps: int):
    """Figure 1: each method's fitted probability of every response, and its log-probability
    (``gamma`` and the Adam ``steps`` go in the title)."""
    bars = (figure1_table(probs, rewards).reset_index(names="method")
            .melt(id_vars="method", var_name="response", value_name="probability"))
    bars["log_probability"] = np.log(bars["probability"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
    sns.barplot(data=bars, x="method", y="probability", hue="response", ax=axes[0])
    sns.barplot(data=bars, x="method", y="log_probability", hue="response", ax=axes[1], legend=False)
    axes[0].set(title=f"Figure 1: fitted probabilities (gamma = {gamma}, {steps} Adam steps)", xlabel="")
    axes[1].set(title="the same, log-probabilities", xlabel="", ylabel="log probability")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30)  # up to a dozen methods
    return _save(fig, path)


def figure1_trajectories(fits: dict, rewards, path=None):
    """Figure 1 over training: each method's probabilities before every Adam step and at the end
    (``theory.figure1_example``'s ``fits``, whose ``logps_curve`` is (T+1, 1, n)), one panel per method."""
    curves = pd.concat([
        pd.DataFrame(np.exp(f["logps_curve"][:, 0, :]), columns=_response_labels(rewards))  # (T+1, n)
        .assign(step=np.arange(len(f["logps_curve"])), method=m)
        for m, f in fits.items()
    ]).melt(id_vars=["step", "method"], var_name="response", value_name="probability")
    g = sns.relplot(data=curves, x="step", y="probability", hue="response", col="method", kind="line", height=2.6,
                    col_wrap=5)
    return _save(g.figure, path)


# The exact tier: metrics["exact"] (vcb_lib.stages.exact), every value exact


def exact_near_tie(policies: dict, path=None, *, gamma: float, order: list[str] | None = None):
    """Figure 1 in trained models: per policy (π_sft, each method, ``opt`` = Eq. 15's π_opt), its
    probability of the last token after the near-tie's shared prefix, averaged over D_t's prompts:
    the best ending y★, the second y☆ (a near-tie: 0.05 less reward), the other tokens (clearly
    worse); and the log-ratio gap Δ★ − Δ☆ against Eq. 12's value (r★ − r☆)/(γσ_r), the black line.
    ``policies``: ``metrics["exact"]["train"]`` (each with its ``near_tie``); ``order``: the policies' order
    (``metrics["exact"]["policies"]``; default: as given)."""
    order = ["sft", *(m for m in order or policies if m not in ("sft", "opt")), "opt"]  # π_sft, the methods, π_opt
    rows = {m: policies[m]["near_tie"] for m in order if m in policies}
    first = next(iter(rows.values()))
    labels = {"last_best": f"y★ (r = {first['r_best']:.2f})", "last_second": f"y☆ (r = {first['r_second']:.2f})",
              "last_other": f"others (r = {first['r_other']:.2f})"}
    bars = pd.DataFrame([{"policy": m, "response": labels[k], "probability": t[k]} for m, t in rows.items() for k in labels])
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    sns.barplot(data=bars, x="policy", y="probability", hue="response", ax=axes[0])
    axes[0].set(xlabel="", ylabel="π(last token | x, shared prefix)", ylim=(0, 1),
                title="The near-tie of Figure 1 in each trained model (mean over D_t's prompts, exact)")
    gaps = pd.DataFrame([{"policy": m, "gap": t["gap"]} for m, t in rows.items()])
    sns.barplot(data=gaps, y="policy", x="gap", ax=axes[1], color=sns.color_palette()[0])
    axes[1].axvline(first["target_gap"], color="k", lw=1.2)
    axes[1].set_xscale("symlog", linthresh=0.1)
    axes[1].set(ylabel="", xlabel="log-ratio gap Δ★ − Δ☆ (black: Eq. 12's (r★ − r☆)/(γσ))",
                title=f"Eq. 12 on the near-tie (γ = {gamma:g})")
    for ax in axes[:1]:
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return _save(fig, path)


def exact_reward_vs_kl(exact: dict, path=None, *, split: str = "train"):
    """Fig. 5 without noise: the exact reward-vs-KL frontier (Eq. 2's optimum π_sft·e^{r/α}/Z for
    every α, one α for all prompts: no policy does better at its KL) and every policy's exact point
    (π_opt = Eq. 15 at the run's γ), on prompt set ``split`` ("train": D_t's prompts, or "test")."""
    front, points = exact[f"frontier_{split}"], pd.DataFrame(exact[split]).T.reset_index(names="policy")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(front["kl"], front["reward"], "k-", lw=1, label="frontier (Eq. 2 optimum)")
    sns.scatterplot(data=points, x="kl", y="reward", hue="policy", style="policy", s=70, ax=ax)
    ax.set(xlabel="KL(π ‖ π_sft) per response (nats, exact)", ylabel="E_π[r] (exact)",
           xlim=(0, max(points.kl.max(), 0.1) * 1.15), title=f"Exact reward vs KL on the {split} prompts")
    ax.legend(fontsize=7)
    return _save(fig, path)


def exact_sweep_frontier(table: pd.DataFrame, frontiers: dict[str, dict], path=None):
    """An exact-tier sweep (``results.csv``: ``label``, ``method``, exact ``reward``/``kl`` on the test
    prompts and ``train_reward``/``train_kl`` on D_t's) against the exact frontier of each prompt set
    (``frontiers``: {"train": ..., "test": ...}, ``metrics["exact"]["frontier_<split>"]``): Fig. 5 with
    no noise, one panel per prompt set, each method's γ points joined in order of KL."""
    splits = [s for s in ("train", "test") if s in frontiers and (s == "test" or f"{s}_reward" in table)]
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.4), squeeze=False)
    colors = dict(zip(table.method.unique(), sns.color_palette(n_colors=table.method.nunique())))
    for ax, split in zip(axes[0], splits):
        x, y = ("kl", "reward") if split == "test" else (f"{split}_kl", f"{split}_reward")
        ax.plot(frontiers[split]["kl"], frontiers[split]["reward"], "k-", lw=1, label="frontier (Eq. 2 optimum)")
        for method, points in table.groupby("method", sort=False):
            points = points.sort_values(x)
            ax.plot(points[x], points[y], "o-", color=colors[method], label=method, ms=5, lw=0.8)
            for _, p in points.iterrows():
                ax.annotate(str(p["label"]).split(", ")[-1], (p[x], p[y]), fontsize=6, xytext=(3, -8), textcoords="offset points")
        where = "D_t's (train) prompts" if split == "train" else "the test prompts"
        ax.set(xlabel="KL(π ‖ π_sft) per response (nats, exact)", ylabel=f"E_π[r] on {where} (exact)",
               xlim=(0, max(table[x].max(), 0.1) * 1.1), title=f"Exact reward vs KL on {where}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
