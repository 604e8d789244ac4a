"""Hyper-parameter sweeps (App. A.6): ``python -m vcb_lib sweep params/sweeps/gamma.yaml``.

A sweep file declares a base params file, overrides shared by every point, a grid over any
config keys (their cartesian product) and optional extra points::

    name: gamma                      # outputs/<name>/ (under the base file's run.output_root)
    base: ../default.yaml            # params file of every point, relative to this sweep file
    set: {training.methods: [vcb]}   # overrides of every point
    grid: {training.gamma: [0.01, 0.05, 0.1, 0.5]}
    points: [{label: w/o, set: {training.reduction: mean}}]   # optional, beside the grid

Each point runs notebooks 03 (train) and 04 (evaluate) through the runner into
``outputs/<run>/sweeps/<sweep>/<point>/``. Points whose upstream (π_sft, reward model, D_t: see
``upstream_key``) is the same share it: the base run's folder when it is current, else one
``<sweep>/upstream-<hash>/`` built once by notebooks 01-02. A finished point (its ``point.json``
is current for the point's config, ``vcb_lib.stages.ablations``) is skipped, so a killed sweep resumes where it stopped; within a point,
training resumes from its checkpoints when ``training.save_every`` > 0 and sampling from its shards.
Points sharing an upstream also share π_sft's evaluation samples and the held-out pool, drawn
once in the upstream folder (``ablations.share_sft_evaluation``), so every point is scored on the
same pool candidates. ``results.csv`` holds one row per point: VCB's (or the first method's) win
rate over π_sft under the evaluation reward, with its bootstrap interval, and reward / KL(π‖π_sft)
on the sampled test prompts; on the pool, its expected evaluation reward and difference with π_sft
(95% CIs), Eq. 12's slope, the misalignment rate, and its paired difference with the sweep's first
point (``vs_first``, 95% CI, resolved per comparison and family-wise: ``ablations.compare_points``).
``shared_pool`` says whether the point was scored on its upstream's pool: False when the upstream
folder was busy (another process writing it) and the point drew its own, so its comparisons pair
prompts only, not candidates (wider CIs; logged, and marked in the report). A point whose pool is
stale or corrupt when the points are compared is rebuilt (its stages 03-04 rerun), and the sweep
fails naming it if it still cannot be read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from vcb_lib.config import Config, ConfigError, _yaml, load_params, parse_override, resolve_path
from vcb_lib.manifest import key_hash
from vcb_lib.stages import ablations, artefacts, evaluate

if TYPE_CHECKING:
    import pandas as pd

SWEEP_KEYS = ("name", "base", "set", "grid", "points")
POINT_STAGES = ["03", "04"]  # train, evaluate
UPSTREAM_STAGES = ["01", "02"]  # π_sft + reward model, D_t


@dataclass
class Point:
    name: str  # folder name
    label: str  # x-axis label in the figures
    overrides: dict[str, Any] = field(default_factory=dict)  # this point's keys on top of the sweep's `set`


@dataclass
class Sweep:
    name: str
    base: Path
    set: dict[str, Any]
    grid: dict[str, list]
    points: list[Point]
    source: Path
    extra: dict[str, Any] = field(default_factory=dict)  # the caller's overrides (e.g. a run's --set), under `set`

    @property
    def keys(self) -> list[str]:
        """The swept keys, grid first."""
        return list(dict.fromkeys([*self.grid, *(k for p in self.points for k in p.overrides)]))

    def overrides(self, point: Point | None = None, **run: Any) -> dict[str, Any]:
        """Base file < the caller's overrides < the sweep's ``set`` < the point's keys < ``run.*``."""
        return {**self.extra, **self.set, **(point.overrides if point else {}), **{f"run.{k}": v for k, v in run.items()}}

    def config(self, point: Point, **run: Any) -> Config:
        """The point's resolved config; ``run`` sets run.* keys (name, upstream, ...)."""
        overrides = self.overrides(point, **run)
        try:
            return load_params(self.base, overrides)
        except ConfigError as err:
            raise ConfigError(f"{self.source}, point {point.name!r}: {err}") from None

    def root(self) -> Path:
        """``<run>/sweeps/<name>/``: inside the folder of the run it belongs to (the base file's,
        with the caller's overrides), so runs with other names never share a sweep."""
        return load_params(self.base, self.overrides()).run_dir / "sweeps" / self.name


def _folder(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "point"


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file; every point's config is checked before anything runs.
    ``overrides`` (``section.key=value``) apply to every point, under the sweep's own keys."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = _yaml(path.read_text(encoding="utf-8")) or {}  # the params files' loader: 5e-6 is a number
    except UnicodeDecodeError as err:  # a binary file, or text in another encoding
        raise ConfigError(f"{path} is not a sweep file: expected UTF-8 YAML text (a mapping with keys "
                          f"{list(SWEEP_KEYS)}), but byte {err.start} is not UTF-8 ({err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with keys {list(SWEEP_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {list(SWEEP_KEYS)}")
    for key in ("name", "base"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{path}: '{key}' must be a non-empty string")
    if _folder(raw["name"]) != raw["name"]:
        raise ConfigError(f"{path}: name {raw['name']!r} must be a folder name (letters, digits, '.', '_', '-')")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base params file not found: {base}")
    common, grid = raw.get("set") or {}, raw.get("grid") or {}
    if not isinstance(common, dict) or not isinstance(grid, dict):
        raise ConfigError(f"{path}: 'set' and 'grid' must be mappings of section.key to a value / a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid key {key!r} must list at least one value, got {values!r}")
    points = []
    for combo in product(*grid.values()) if grid else []:
        keys = dict(zip(grid, combo))
        label = ", ".join(_short(v) for v in combo)
        points.append(Point(_folder("_".join(f"{k.rsplit('.', 1)[-1]}-{_short(v)}" for k, v in keys.items())), label, keys))
    for i, extra in enumerate(raw.get("points") or []):
        if not isinstance(extra, dict) or set(extra) - {"label", "set"} or not isinstance(extra.get("set"), dict):
            raise ConfigError(f"{path}: points[{i}] must be {{label: text, set: {{section.key: value}}}}, got {extra!r}")
        label = str(extra.get("label") or ", ".join(f"{k}={_short(v)}" for k, v in extra["set"].items()))
        points.append(Point(_folder(label), label, dict(extra["set"])))
    if not points:
        raise ConfigError(f"{path}: no points: give a 'grid' or 'points'")
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two points share a folder name: {sorted(n for n in names if names.count(n) > 1)}")
    sweep = Sweep(raw["name"], base, common, grid, points, path, dict(parse_override(o) for o in overrides or []))
    for point in points:
        sweep.config(point, name=point.name)  # unknown keys / bad values fail here, before any run
    return sweep


def with_upstream(cfg: Config, upstream: str) -> Config:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, upstream=upstream))


def shared_upstream(base_cfg: Config, cfg: Config) -> str:
    """``run.upstream`` for a point (relative to its output root): the base run's folder when it
    holds this point's upstream, current, else ``upstream-<hash>`` (to be built once, then shared)."""
    base = os.path.relpath(base_cfg.run_dir, resolve_path(cfg.run.output_root))
    if base != cfg.run.name and ablations.upstream_current(with_upstream(cfg, base)):
        return base
    return f"upstream-{upstream_key(cfg)}"


def upstream_key(cfg: Config) -> str:
    """Short hash of what a point's upstream (π_sft, reward model, D_t) depends on: points with
    equal keys share one upstream folder (``vcb_lib.stages.artefacts.UPSTREAM``)."""
    return key_hash(artefacts.candidates(cfg).key)


def run_sweep(path: str | Path, overrides: list[str] | None = None, *,
              log: Callable[[str], None] = print) -> "pd.DataFrame":
    """Run every unfinished point; return (and write ``<sweep>/results.csv``) one row per point.
    ``overrides`` apply to every point (notebook 06 passes its run's, so a sweep follows the run's
    ``run.output_root`` and shares the run's upstream)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from vcb_lib.io import atomic_write_text, folder_lock
    from vcb_lib.runner import run

    sweep = load_sweep(path, overrides)
    root = sweep.root()
    root.mkdir(parents=True, exist_ok=True)
    output_root = str(root.relative_to(resolve_path(".")) if root.is_relative_to(resolve_path(".")) else root)
    base_cfg = load_params(sweep.base, sweep.extra)  # the caller's run: its upstream may be shared

    def row(point: Point, cfg: Config, record: dict) -> dict:
        return ({k: v for k, v in record.items() if k not in ("config", "overrides")} |
                {k: _short(cfg_value(cfg, k)) for k in sweep.keys})

    def run_point(point: Point, cfg: Config) -> dict:
        """Stages 03-04 of one point (π_sft's samples and the pool first, once per upstream); its row."""
        if not ablations.share_sft_evaluation(cfg, log=log):  # π_sft's samples and the pool: once per upstream
            log(f"[{sweep.name}] point {point.name}: the upstream folder is busy: scored on a pool of its own, paired "
                f"with the other points over prompts only (results.csv: shared_pool = False; the report marks it)")
        log(f"[{sweep.name}] point {point.name}: {point.overrides}")
        run(sweep.base, _strings(sweep.overrides(point, name=point.name, output_root=output_root, upstream=cfg.run.upstream)),
            only=POINT_STAGES, log=log)
        return row(point, cfg, ablations.record_point(cfg, point.name, point.label, evaluate.read_metrics(cfg),
                                                      overrides=point.overrides))

    with folder_lock(root):  # one writer per sweep folder (each point is locked by its run)
        rows, cfgs = {}, {}
        bar = tqdm(sweep.points, desc=f"sweep {sweep.name}", unit="point")
        for point in bar:
            bar.set_postfix_str(point.name)
            cfg = sweep.config(point, name=point.name, output_root=output_root)
            record = ablations.point_metrics(cfg)
            upstream = shared_upstream(base_cfg, cfg)
            cfg = cfgs[point.name] = sweep.config(point, name=point.name, output_root=output_root, upstream=upstream)
            if record is None:
                if not ablations.upstream_current(cfg):
                    log(f"[{sweep.name}] upstream {upstream} (stages 01-02)")
                    run(sweep.base, _strings(sweep.overrides(point, name=upstream, output_root=output_root)),
                        only=UPSTREAM_STAGES, log=log)
                rows[point.name] = run_point(point, cfg)
            else:  # a finished point: its row re-read from its metrics (point.json may predate a column)
                rows[point.name] = row(point, cfg, record | ablations.summarise_point(evaluate.read_metrics(cfg)))

        def rebuild(name: str) -> None:  # a point whose pool is stale or corrupt: its stages 03-04 again
            rows[name] = run_point(next(p for p in sweep.points if p.name == name), cfgs[name])

        pairs = ablations.compare_points(cfgs, log=log, rebuild=rebuild)
        table = pd.DataFrame([r | pairs.get(r["point"], {}) for r in rows.values()])
        atomic_write_text(root / "results.csv", table.to_csv(index=False))
    return table


def cfg_value(cfg: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _strings(overrides: dict[str, Any]) -> list[str]:
    """``{"training.gamma": 0.1}`` -> ``["training.gamma=0.1"]`` (JSON is YAML, so values round-trip)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def sweep_title(sweep: Sweep) -> str:
    """Panel title: the swept key names (``gamma``, ``lam, reduction``)."""
    return ", ".join(k.rsplit(".", 1)[-1] for k in sweep.keys)


def write_figure(path: str | Path, overrides: list[str] | None = None) -> Path:
    """``<sweep>/win_rate.png`` from ``results.csv`` (one panel); with the pool's paired comparisons
    also ``<sweep>/pool.png`` (each point vs π_sft and vs the first point); on the exact tier (rows
    with ``regret``) also ``<sweep>/frontier.png``: the points against the exact reward-vs-KL frontier."""
    import pandas as pd

    from vcb_lib.plots import exact_sweep_frontier, sweep_pool_differences, sweep_win_rates

    sweep = load_sweep(path, overrides)
    out = sweep.root() / "win_rate.png"
    table = pd.read_csv(sweep.root() / "results.csv")
    sweep_win_rates({sweep_title(sweep): table}, out)
    if "vs_first" in table and table.vs_first.notna().any():
        sweep_pool_differences(table, sweep.root() / "pool.png")
    if "regret" in table:  # every point shares the test prompts and π_sft, hence one frontier
        first = sweep.config(sweep.points[0], name=sweep.points[0].name, output_root=str(sweep.root()))
        exact = evaluate.read_metrics(first)["exact"]
        exact_sweep_frontier(table, {s: exact[f"frontier_{s}"] for s in ("train", "test")}, sweep.root() / "frontier.png")
    return out
