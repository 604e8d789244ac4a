"""Stage 05 (notebook 05): the paper's figures for this run, from stage 04's checked metrics and
samples (``vcb_lib.plots``). The report itself is written by ``vcb_lib.report``."""
from __future__ import annotations

from pathlib import Path

from vcb_lib import plots
from vcb_lib.config import Config
from vcb_lib.stages.evaluate import read_metrics, read_samples


def run(cfg: Config) -> tuple[dict, dict[str, Path]]:
    """Draw Table 2 / 5 / 6 and Figs. 5 / 8 into ``<run>/figures/`` (on the exact tier also the
    near-tie of Figure 1 in each trained model and the exact reward-vs-KL frontier); returns the
    metrics and the figure paths by name."""
    metrics, samples = read_metrics(cfg), read_samples(cfg, "test")
    fig_dir = cfg.stage_dir("figures")
    ref, reward = metrics["reference"], metrics["evaluation_reward_name"]
    paths = {name: fig_dir / f"{name}.png" for name in
             ("table2_win_rates", "table5_ood_win_rates", "fig5_reward_vs_kl", "table6_misalignment", "fig8_lengths")}
    plots.win_rates(metrics["win_rate"], paths["table2_win_rates"], reference=ref, reward=reward)
    if metrics.get("ood_win_rate"):
        plots.win_rates(metrics["ood_win_rate"], paths["table5_ood_win_rates"], reference=ref, reward=reward,
                        title="out-of-distribution prompts, Table 5")
    else:
        del paths["table5_ood_win_rates"]
    plots.reward_vs_kl(metrics["reward_kl"], paths["fig5_reward_vs_kl"], reward=reward, curve=metrics.get("reward_kl_curve"))
    plots.metric_bars({m: v for m, v in metrics["misalignment_rate"].items() if v is not None}, paths["table6_misalignment"], ylabel="misalignment rate",
                      title="Misalignment (A.5, Table 6)")
    plots.lengths(samples, paths["fig8_lengths"])
    if metrics.get("exact"):  # the exact tier: the near-tie of Figure 1 in the trained models, the exact frontier
        exact = metrics["exact"]
        paths |= {"exact_near_tie": fig_dir / "exact_near_tie.png", "exact_reward_vs_kl": fig_dir / "exact_reward_vs_kl.png"}
        plots.exact_near_tie(exact["train"], paths["exact_near_tie"], gamma=exact["gamma"], order=exact.get("policies"))
        plots.exact_reward_vs_kl(exact, paths["exact_reward_vs_kl"], split="train")
    return metrics, paths
