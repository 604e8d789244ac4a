"""Stage 06 (notebook 06, App. A.6): one hyper-parameter point is stages 03-04 on a shared
upstream (π_sft, the reward model, D_t). The sweeps (``vcb_lib.sweep``, through the runner's
notebooks 03-04) and the widget panel (``vcb_lib.widgets``, in a thread) both run points with
these functions, so a point gives the same ``metrics.json`` whichever front ran it.

A finished point has ``<point>/point.json`` (its summary row, an artefact checked like every
other): a rerun with the same config reads it back instead of training again.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from vcb_lib.config import Config
from vcb_lib.io import read_json, write_json
from vcb_lib.manifest import Artefact
from vcb_lib.stages import artefacts, evaluate, generate, sft_and_reward, train

STAGE = "06_ablations"


def upstream_config(cfg: Config) -> Config:
    """The config that builds ``cfg``'s upstream folder (``run.upstream``) as a run of its own."""
    if not cfg.run.upstream:
        return cfg
    up = cfg.upstream_dir
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


def share_sft_evaluation(cfg: Config, *, log=print) -> bool:
    """Draw what stage 04 needs from π_sft alone (its test/OOD samples, the held-out pool) once, in
    the upstream run's folder, where every point reading that upstream finds it
    (:func:`vcb_lib.stages.artefacts.shared`): a sweep then draws it once, not once per point, and
    all its points are scored on one pool, so their per-prompt estimates pair. Returns True when
    the upstream holds them, current. False, with a log line, when that folder is being written by
    another process (a run whose notebook 06 runs this sweep: its own notebook 04 drew them when
    its evaluation keys are the point's); each point then draws its own, as a run of its own does."""
    from vcb_lib.io import FolderBusy, folder_lock

    up = upstream_config(cfg)
    todo = [s for s in evaluate.splits(up) if not artefacts.samples(up, "sft", s).current()]
    if not todo and artefacts.pool(up).current():
        return True
    try:
        with folder_lock(up.run_dir):
            for split in todo:
                evaluate.sample_policies(up, split, ["sft"], log=log)
            evaluate.build_pool(up, log=log)  # reused when current
    except FolderBusy as err:
        log(f"π_sft's evaluation stays per point: {err}")
        return False
    return True


def run_point(cfg: Config, *, log=print, step: Callable[[str], None] = lambda stage: None) -> dict:
    """Stages 03-04 for one point, as notebooks 03-04 run them; returns stage 04's metrics.
    ``step`` is called before each stage (progress)."""
    for method in cfg.training.methods:
        step(f"train {method}")
        train.train_method(cfg, method, log=log)
    train.run(cfg, log=log)  # every method is current now: this only writes 03_train/metrics.json
    step("evaluate")
    return evaluate.run(cfg, log=log)


class PointPoolError(RuntimeError):
    """A sweep point's pool estimate cannot be read (its pool or its policy's scores are missing,
    stale or corrupt), and rebuilding it did not help or was not possible."""


def shared_pool(cfg: Config) -> bool:
    """Whether the point is scored on its upstream's pool (drawn once there by
    :func:`share_sft_evaluation`, shared by every point of that upstream), not on one of its own
    (drawn when the upstream folder was busy, or when the point has no upstream). A point that drew
    its own keeps it, and its scores were computed on it, whatever the upstream holds later."""
    return bool(cfg.run.upstream) and pool_file(cfg) != artefacts.own(cfg, artefacts.pool(cfg)).path


def pool_file(cfg: Config) -> Path:
    """The pool file the point was scored on: its own when it drew one, else the one it reads
    (``artefacts.pool``: the upstream's when current there)."""
    art = artefacts.pool(cfg)
    own = artefacts.own(cfg, art).path
    return own if own.is_file() else art.path


def compare_points(points: dict[str, Config], *, log=print,
                   rebuild: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Every point against the first one, paired by prompt on the held-out pool: per point, the mean
    over prompts of (its method's per-prompt estimate − the first point's) as ``vs_first`` with its
    95% bootstrap CI (``vs_first_lo``/``_hi``) and ``vs_first_resolved``, and
    ``vs_first_resolved_all``: whether the CI at the family-wise level 1 − 0.05/(points − 1)
    (Bonferroni over the comparisons) excludes 0 too. That interval's bootstrap has enough resamples
    for 50 beyond each of its bounds (``metrics.resamples_for_level``: 2000 per comparison, at least
    ``evaluation.bootstrap``), not the few in each tail that 1000 would leave.

    Every point (the first too) gets ``shared_pool`` (:func:`shared_pool`: False when the upstream
    folder was busy and the point drew a pool of its own), each compared one ``same_pool``: both were
    scored on the same candidates. On different pools of the same prompts the pairing is over
    prompts only and the CI wider; the report marks those points.

    A point whose pool cannot be read (missing, stale or corrupt pool or scores) is rebuilt with
    ``rebuild(name)`` (the sweep reruns its stages 03-04) and read again; without ``rebuild``, or
    when it still cannot be read, :class:`PointPoolError` names the point. A point whose pool has
    other prompts (other evaluation settings) gets no comparison (logged)."""
    from vcb_lib.manifest import ArtefactError
    from vcb_lib.metrics import paired_difference, resamples_for_level

    def per_prompt(name: str):
        cfg = points[name]
        try:
            return evaluate.pool_per_prompt(cfg, evaluate.reference_method(cfg))
        except (ArtefactError, ValueError) as err:
            if rebuild is None:
                raise PointPoolError(f"sweep point {name!r}: its pool cannot be read: {err}") from err
            log(f"point {name}: its pool cannot be read ({err}); rebuilding it")
        rebuild(name)
        try:
            return evaluate.pool_per_prompt(cfg, evaluate.reference_method(cfg))
        except (ArtefactError, ValueError) as err:
            raise PointPoolError(f"sweep point {name!r}: its pool cannot be read, even after rebuilding it: {err}") from err

    names = list(points)
    if len(names) < 2:
        return {name: {"shared_pool": shared_pool(cfg)} for name, cfg in points.items()}
    first_cfg = points[names[0]]
    e, family = first_cfg.evaluation, 1 - 0.05 / (len(names) - 1)
    first = per_prompt(names[0])
    out = {names[0]: {"shared_pool": shared_pool(first_cfg)}}
    for name in names[1:]:
        cfg = points[name]
        mine = per_prompt(name)
        out[name] = {"shared_pool": shared_pool(cfg), "same_pool": pool_file(cfg) == pool_file(first_cfg)}
        if list(mine.index) != list(first.index):
            log(f"point {name}: not compared with {names[0]}: its pool has other prompts")
            continue
        d = paired_difference(mine.to_numpy(), first.to_numpy(), bootstrap=e.bootstrap, seed=cfg.run.seed)
        d_all = paired_difference(mine.to_numpy(), first.to_numpy(), seed=cfg.run.seed, ci=family,
                                  bootstrap=resamples_for_level(family, e.bootstrap) if e.bootstrap > 0 else 0)
        lo, hi = d["ci"] or [None, None]
        out[name] |= {"vs_first": d["diff"], "vs_first_lo": lo, "vs_first_hi": hi, "vs_first_resolved": d["resolved"],
                      "vs_first_resolved_all": d_all["resolved"]}
    return out


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
            "sft_reward": metrics["reward_kl"].get("sft", {}).get("reward"), **pool_summary(metrics.get("pool"), method)}


def pool_summary(pool: dict | None, method: str) -> dict:
    """The point's row from the held-out pool (``metrics["pool"]``, its 95% CIs over prompts): the
    method's expected evaluation reward ``pool_gold``, its paired difference with π_sft
    ``pool_vs_sft`` (and ``pool_vs_sft_resolved``), the Eq. 12 slope and the misalignment rate."""
    if not pool:
        return {}
    m, vs = pool["methods"].get(method, {}), pool["paired"].get(f"{method}-vs-sft", {})
    lo_hi = lambda ci: ci or [None, None]  # noqa: E731
    return {"pool_gold": m.get("gold"), **dict(zip(("pool_gold_lo", "pool_gold_hi"), lo_hi(m.get("gold_ci")))),
            "pool_vs_sft": vs.get("gold_diff"), **dict(zip(("pool_vs_sft_lo", "pool_vs_sft_hi"), lo_hi(vs.get("ci")))),
            "pool_vs_sft_resolved": vs.get("resolved"), "slope": m.get("slope"),
            **dict(zip(("slope_lo", "slope_hi"), lo_hi(m.get("slope_ci")))), "misalignment": m.get("misalignment_rate")}


def record_point(cfg: Config, name: str, label: str, metrics: dict, **extra: Any) -> dict:
    """Write ``<point>/point.json`` (marks the point finished for this config) and return it."""
    art = point_artefact(cfg)
    record = {"point": name, "label": label, **summarise_point(metrics), **extra}
    write_json(art.path, record)
    art.seal()
    return record
