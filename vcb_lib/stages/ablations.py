"""Stage 06 (notebook 06, App. A.6): one hyper-parameter point is stages 03-04 on a shared
upstream (π_sft, the reward model, D_t). The sweeps (``vcb_lib.sweep``, through the runner's
notebooks 03-04) and the widget panel (``vcb_lib.widgets``, in a thread) both run points with
these functions, so a point gives the same ``metrics.json`` whichever front ran it.

A finished point has ``<point>/point.json`` (its summary row, an artefact checked like every
other): a rerun with the same config reads it back instead of training again.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from vcb_lib.config import Config, resolve_path
from vcb_lib.io import read_json, write_json
from vcb_lib.manifest import Artefact
from vcb_lib.stages import artefacts, evaluate, generate, sft_and_reward, train

STAGE = "06_ablations"


def upstream_config(cfg: Config) -> Config:
    """The config that builds ``cfg``'s upstream folder (``run.upstream``) as a run of its own."""
    if not cfg.run.upstream:
        return cfg
    up = (resolve_path(cfg.run.output_root) / cfg.run.upstream).resolve()
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=up.name, upstream="", output_root=str(up.parent)))


def upstream_current(cfg: Config) -> bool:
    """π_sft (when trained), the reward model (when learned) and D_t are current for ``cfg``."""
    arts = [artefacts.candidates(cfg)]
    if cfg.models.sft:
        arts.append(artefacts.sft(cfg))
    if cfg.rewards.reward_model == "learned":
        arts.append(artefacts.reward_model(cfg))
    return all(a.current() for a in arts)


def build_upstream(cfg: Config, *, log=print) -> None:
    """Stages 01-02 for ``cfg``'s upstream folder, exactly as notebooks 01-02 run them."""
    up = upstream_config(cfg)
    sft_and_reward.run(up, log=log)
    generate.run(up, log=log)


def run_point(cfg: Config, *, log=print, step: Callable[[str], None] = lambda stage: None) -> dict:
    """Stages 03-04 for one point, as notebooks 03-04 run them; returns stage 04's metrics.
    ``step`` is called before each stage (progress)."""
    for method in cfg.training.methods:
        step(f"train {method}")
        train.train_method(cfg, method, log=log)
    train.run(cfg, log=log)  # every method is current now: this only writes 03_train/metrics.json
    step("evaluate")
    return evaluate.run(cfg, log=log)


def point_artefact(cfg: Config) -> Artefact:
    return Artefact(cfg.run_dir / "point.json", STAGE,
                    cfg.slice("run", "models", "sampling", "rewards", "training", "evaluation"))


def point_metrics(cfg: Config) -> dict | None:
    """The point's row when it finished for this config, else None."""
    art = point_artefact(cfg)
    return read_json(art.path) if art.current() else None


def summarise_point(metrics: dict) -> dict:
    """One row: the reference method's win rate over π_sft (± interval) and its reward / KL. On an
    enumerable task (``metrics["exact"]``) the values are exact (``exact``: True; the interval is the
    value itself, the SEs 0) and the row adds how far the method is from the optimum:
    ``frontier_reward`` (Eq. 2's optimum at the method's KL), ``regret`` (that minus the method's
    reward) and ``kl_to_opt`` (KL to Eq. 15's π_opt), all on the test prompts, and ``train_reward``,
    ``train_kl``, ``train_regret``, ``train_kl_to_opt`` on D_t's prompts (where the method trained)."""
    method = metrics["reference"]
    exact = metrics.get("exact")
    if exact:
        win, rk, test = exact["win_rate"].get("sft", {}), exact["reward_kl"].get(method, {}), exact["test"].get(method, {})
        return {"method": method, "win": win.get("win"), "tie": win.get("tie"), "lose": win.get("lose"),
                "win_rate": win.get("win_rate"), "win_rate_lo": win.get("win_rate"), "win_rate_hi": win.get("win_rate"),
                "reward": rk.get("reward"), "reward_se": 0.0, "kl": rk.get("kl"), "kl_se": 0.0,
                "sft_reward": exact["reward_kl"]["sft"]["reward"], "exact": True,
                "frontier_reward": test.get("frontier_reward"), "regret": test.get("regret"), "kl_to_opt": test.get("kl_to_opt"),
                **{f"train_{k}": exact["train"].get(method, {}).get(k) for k in ("reward", "kl", "regret", "kl_to_opt")}}
    win = metrics["win_rate"].get("sft", {})
    ci = win.get("win_rate_ci") or [None, None]
    rk = metrics["reward_kl"].get(method, {})
    return {"method": method, "win": win.get("win"), "tie": win.get("tie"), "lose": win.get("lose"),
            "win_rate": win.get("win_rate"), "win_rate_lo": ci[0], "win_rate_hi": ci[1],
            "reward": rk.get("reward"), "reward_se": rk.get("reward_se"), "kl": rk.get("kl"), "kl_se": rk.get("kl_se"),
            "sft_reward": metrics["reward_kl"].get("sft", {}).get("reward")}


def record_point(cfg: Config, name: str, label: str, metrics: dict, **extra: Any) -> dict:
    """Write ``<point>/point.json`` (marks the point finished for this config) and return it."""
    art = point_artefact(cfg)
    record = {"point": name, "label": label, **summarise_point(metrics), **extra}
    write_json(art.path, record)
    art.seal()
    return record
