"""Sweep files (App. A.6 ablations): validation before anything runs, grid expansion, upstream
sharing, and a sweep that survives being killed between points."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from vcb_lib.config import PROJECT_ROOT, ConfigError, load_params
from vcb_lib.sweep import load_sweep, run_sweep, upstream_key

SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"


def write(tmp_path, text: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(text.replace("BASE", str(SMOKE)))
    return path


def test_grid_is_a_cartesian_product_plus_extra_points(tmp_path):
    path = write(tmp_path, """
name: abl
base: BASE
set: {training.methods: [vcb]}
grid: {training.gamma: [0.1, 0.5], sampling.temperature: [0.7, 1.0]}
points: [{label: w/o, set: {training.reduction: mean}}]
""")
    sweep = load_sweep(path)
    assert [p.name for p in sweep.points] == ["gamma-0.1_temperature-0.7", "gamma-0.1_temperature-1.0",
                                              "gamma-0.5_temperature-0.7", "gamma-0.5_temperature-1.0", "w-o"]
    assert [p.label for p in sweep.points][-1] == "w/o" and sweep.points[0].label == "0.1, 0.7"
    assert sweep.keys == ["training.gamma", "sampling.temperature", "training.reduction"]
    cfg = sweep.config(sweep.points[2], name="x")
    assert (cfg.training.gamma, cfg.sampling.temperature, cfg.training.methods) == (0.5, 0.7, ["vcb"])
    assert sweep.config(sweep.points[4], name="x").training.reduction == "mean"
    # the caller's overrides sit under the sweep's own keys
    sweep = load_sweep(path, ["training.gamma=9.0", "training.lam=3.0", "run.seed=4"])
    cfg = sweep.config(sweep.points[4], name="x")
    assert (cfg.training.gamma, cfg.training.lam, cfg.run.seed) == (9.0, 3.0, 4)
    assert sweep.config(sweep.points[0], name="x").training.gamma == 0.1


def test_points_share_an_upstream_unless_they_change_it(tmp_path):
    sweep = load_sweep(write(tmp_path, """
name: abl
base: BASE
grid: {training.gamma: [0.1, 0.5], training.lam: [1.0, 2.0]}
points: [{label: w/o, set: {training.reduction: mean}}, {label: t, set: {sampling.temperature: 0.5}},
         {label: bf16, set: {training.bf16: true}}]
"""))
    keys = {p.label: upstream_key(sweep.config(p, name=p.name)) for p in sweep.points}
    assert len({keys[p.label] for p in sweep.points[:5]}) == 1  # loss hyper-parameters: one upstream
    assert keys["t"] != keys["w/o"] and keys["bf16"] != keys["w/o"]  # D_t sampled / scored differently


def test_config_hash_ignores_where_a_run_writes_but_not_what_it_computes():
    a = load_params(SMOKE)
    b = load_params(SMOKE, ["run.name=other", "run.output_root=/tmp/x", "run.upstream=../smoke"])
    assert a.hash() == b.hash() and upstream_key(a) == upstream_key(b)
    assert a.hash() != load_params(SMOKE, ["run.seed=1"]).hash()
    assert upstream_key(a) != upstream_key(load_params(SMOKE, ["run.seed=1"]))
    assert upstream_key(a) == upstream_key(load_params(SMOKE, ["training.gamma=0.3", "training.methods=[dpo]"]))


@pytest.mark.parametrize("text, message", [
    ("name: a\nbase: BASE\ngrid: {training.gamma: [0.1]}\ncolour: red\n", "unknown key(s) ['colour']; allowed: ['name', 'base'"),
    ("name: a\nbase: BASE\ngrid: {training.gama: [0.1]}\n", "Did you mean 'training.gamma'?"),
    ("name: a\nbase: BASE\ngrid: {training.gamma: [-1.0]}\n", "training.gamma: must be > 0"),
    ("name: a\nbase: BASE\ngrid: {training.gamma: 0.1}\n", "grid key 'training.gamma' must list at least one value"),
    ("name: a\nbase: nowhere.yaml\ngrid: {training.gamma: [0.1]}\n", "base params file not found"),
    ("name: a b\nbase: BASE\ngrid: {training.gamma: [0.1]}\n", "must be a folder name"),
    ("name: a\nbase: BASE\n", "no points"),
    ("name: a\nbase: BASE\npoints: [{label: x, set: {training.lam: 2.0}}, {label: x, set: {training.lam: 3.0}}]\n",
     "two points share a folder name: ['x', 'x']"),
    ("name: a\nbase: BASE\npoints: [{set: 3}]\n", "points[0] must be {label: text, set: {section.key: value}}"),
])
def test_bad_sweep_files_fail_before_running(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write(tmp_path, text))
    assert message in str(err.value)


def test_bad_point_names_the_point(tmp_path):
    with pytest.raises(ConfigError, match=r"point 'bad'.*sampling.temperature: must be > 0"):
        load_sweep(write(tmp_path, "name: a\nbase: BASE\npoints: [{label: bad, set: {sampling.temperature: 0.0}}]\n"))


def test_command_line_reports_a_bad_sweep(tmp_path):
    path = write(tmp_path, "name: a\nbase: BASE\ngrid: {training.gama: [0.1]}\n")
    proc = subprocess.run([sys.executable, "-m", "vcb_lib", "sweep", str(path)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)
    assert proc.returncode == 2 and "Did you mean 'training.gamma'?" in proc.stderr
    good = write(tmp_path, "name: a\nbase: BASE\ngrid: {training.gamma: [0.1]}\n", name="good.yaml")
    proc = subprocess.run([sys.executable, "-m", "vcb_lib", "sweep", str(good), "--set", "training.lam=-1"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT)  # --set reaches every point, checked first
    assert proc.returncode == 2 and "training.lam" in proc.stderr and "Traceback" not in proc.stderr


def test_scientific_notation_is_a_number_as_in_params_files(tmp_path):
    """YAML 1.1 reads 5e-6 as a string; sweep files use the params files' loader."""
    sweep = load_sweep(write(tmp_path, "name: lr\nbase: BASE\ngrid: {training.learning_rate: [5e-6, 1e-5]}\n"))
    assert sweep.grid["training.learning_rate"] == [5e-6, 1e-5]
    assert all(type(v) is float for v in sweep.grid["training.learning_rate"])
    assert [sweep.config(p, name=p.name).training.learning_rate for p in sweep.points] == [5e-6, 1e-5]


def test_yaml_syntax_error_names_the_file(tmp_path, capsys):
    from vcb_lib.__main__ import main

    path = write(tmp_path, "name: a\nbase: BASE\ngrid: {training.gamma: [0.1, 0.5}\n", name="bad.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid YAML")):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{path} is not valid YAML" in err and "Traceback" not in err


@pytest.mark.notebook
def test_killed_sweep_resumes_without_redoing_finished_points(tmp_path):
    """``python -m vcb_lib sweep`` killed (SIGKILL) after its first point: a second run keeps that
    point, builds the shared upstream only once, finishes the rest and aggregates every point."""
    out = tmp_path / "outputs"
    path = write(tmp_path, f"""
name: abl
base: BASE
set: {{training.methods: [vcb], run.output_root: {out}}}
grid: {{training.gamma: [0.1, 1.0]}}
""")
    root = out / "smoke" / "sweeps" / "abl"  # inside the base run's folder
    first = root / "gamma-0.1" / "point.json"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "vcb_lib", "sweep", str(path)], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not first.is_file():
            assert proc.poll() is None, f"the sweep ended (rc {proc.returncode}) before its first point finished"
            assert time.monotonic() < deadline, "first point did not finish in 15 min"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (root / "results.csv").exists()
    stamp = first.stat().st_mtime
    upstream = list(root.glob("upstream-*"))
    assert len(upstream) == 1 and (upstream[0] / "02_candidates" / "candidates.parquet").is_file()
    cand = (upstream[0] / "02_candidates" / "candidates.parquet").stat().st_mtime

    lines = []
    table = run_sweep(path, log=lines.append)
    assert list(table.point) == ["gamma-0.1", "gamma-1.0"] and first.stat().st_mtime == stamp
    assert [line for line in lines if "point gamma-" in line] == ["[abl] point gamma-1.0: {'training.gamma': 1.0}"]
    assert not [line for line in lines if "upstream" in line and "stages 01-02" in line]
    assert (upstream[0] / "02_candidates" / "candidates.parquet").stat().st_mtime == cand
    assert list(root.glob("upstream-*")) == upstream
    saved = pd.read_csv(root / "results.csv")
    assert list(saved["training.gamma"]) == [0.1, 1.0] and saved.win_rate.between(0, 1).all()
    # π_sft's samples and the pool were drawn once, in the shared upstream; each point holds only its own policy's
    assert {p.name for p in (upstream[0] / "04_eval").iterdir() if p.is_dir()} == {"pool", "sft"}
    for r in saved.itertuples():
        assert sorted(p.name for p in (root / r.point / "04_eval").iterdir() if p.is_dir()) == ["pool", "vcb"]
        assert [p.name for p in (root / r.point / "04_eval" / "pool").glob("*.parquet")] == ["vcb.parquet"]
        assert json.loads((root / r.point / "point.json").read_text())["win_rate"] == pytest.approx(r.win_rate)
        assert r.pool_gold_lo <= r.pool_gold <= r.pool_gold_hi and r.pool_vs_sft_lo <= r.pool_vs_sft <= r.pool_vs_sft_hi
    # the second point against the first, paired on the same pool candidates, by hand
    from vcb_lib.metrics import paired_difference
    from vcb_lib.stages.evaluate import pool_per_prompt

    sweep = load_sweep(path)
    cfgs = [sweep.config(p, name=p.name, output_root=str(root), upstream=upstream[0].name) for p in sweep.points]
    a, b = (pool_per_prompt(c, "vcb") for c in cfgs)
    d = paired_difference(b.to_numpy(), a.to_numpy(), bootstrap=cfgs[0].evaluation.bootstrap, seed=0)
    second = saved.iloc[1]
    assert second.same_pool and second.vs_first == pytest.approx(d["diff"]) and second.vs_first_lo == pytest.approx(d["ci"][0])
    assert abs(second.vs_first) > 0 and np.isnan(saved.iloc[0].vs_first)  # trained with other γ; the first is the reference
    metrics = json.loads((root / "gamma-1.0" / "04_eval" / "metrics.json").read_text())
    assert metrics["pool"]["methods"]["vcb"]["gold"] == pytest.approx(float(b.mean()))


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "params" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_loads(path):
    """Every point trains one method (VCB, except in the value-aware sweeps and the exact frontier's
    method × γ grid), so each row is that method's."""
    sweep = load_sweep(path)
    methods = [sweep.config(p, name=p.name).training.methods for p in sweep.points]
    assert sweep.points and all(len(m) == 1 for m in methods)
    if "value_aware" not in path.name and path.name != "exact_frontier.yaml":
        assert all(m == ["vcb"] for m in methods)


def test_value_aware_sweep_trains_every_variant_on_one_upstream_at_matched_settings():
    """params/sweeps/value_aware.yaml: every value-aware method and each of VCB's options, one per
    point, on one shared upstream (D_t), with the same γ, learning rate, steps and seed."""
    from vcb_lib.losses import LossType

    sweep = load_sweep(PROJECT_ROOT / "params" / "sweeps" / "value_aware.yaml")
    cfgs = [sweep.config(p, name=p.name) for p in sweep.points]
    trained = {c.training.methods[0] for c in cfgs}
    assert {lt.value for lt in LossType if lt.uses_reward_values} | {"dpo"} == trained
    vcb = [c.training for c in cfgs if c.training.methods == ["vcb"]]
    assert {t.normalize for t in vcb} == {"prompt_std", "batch_std", "none", "rank"}
    assert {t.reduction for t in vcb} == {"logsumexp", "mean", "max"} and {t.sigma_policy for t in vcb} == {"floor", "drop"}
    assert len({upstream_key(c) for c in cfgs}) == 1  # one D_t for every point
    matched = {(c.training.gamma, c.training.learning_rate, c.training.max_steps, c.training.epochs, c.run.seed)
               for c in cfgs}
    assert len(matched) == 1 and cfgs[0].training.gamma == load_params(sweep.base).training.gamma


def test_reward_kl_points_put_every_point_side_by_side():
    from vcb_lib.report import reward_kl_points

    table = pd.DataFrame([
        {"label": "vcb rank", "method": "vcb", "reward": 0.30, "reward_se": 0.05, "kl": 0.20, "kl_se": 0.01, "sft_reward": 0.25},
        {"label": "infonca", "method": "infonca", "reward": 0.28, "reward_se": float("nan"), "kl": 0.0, "kl_se": 0.0,
         "sft_reward": 0.25}])
    head, body = reward_kl_points(table)
    assert "π_sft: reward 0.250, KL 0" in head
    assert "| vcb rank | vcb | 0.300 ± 0.050 | 0.200 ± 0.010 | 0.050 | 0.250 |" in body
    assert "| infonca | infonca | 0.280 | 0.000 ± 0.000 | 0.030 | – |" in body  # no SE, no KL: no ratio


def test_pool_points_pair_every_point_with_the_first(tmp_path):
    """The report's pool table: Δ vs π_sft and vs the first point with their CIs, and the verdict
    per comparison and family-wise (a point resolved alone but not at the Bonferroni level says so)."""
    from vcb_lib.report import pool_points

    base = {"method": "vcb", "pool_gold": 0.39, "pool_gold_lo": 0.36, "pool_gold_hi": 0.43, "pool_vs_sft": 0.081,
            "pool_vs_sft_lo": 0.056, "pool_vs_sft_hi": 0.105, "slope": 0.0106, "misalignment": 0.42}
    table = pd.DataFrame([
        base | {"label": "vcb (Eq. 10)", "vs_first": float("nan")},
        base | {"label": "rank", "vs_first": -0.008, "vs_first_lo": -0.015, "vs_first_hi": -0.001,
                "vs_first_resolved": True, "vs_first_resolved_all": False, "same_pool": True},
        base | {"label": "dpo", "method": "dpo", "vs_first": -0.013, "vs_first_lo": -0.021, "vs_first_hi": -0.005,
                "vs_first_resolved": True, "vs_first_resolved_all": True, "same_pool": True},
        base | {"label": "max", "vs_first": 0.002, "vs_first_lo": -0.004, "vs_first_hi": 0.009,
                "vs_first_resolved": False, "vs_first_resolved_all": False, "same_pool": True}])
    head, body = pool_points(table)
    assert "same π_sft candidates" in head and "Bonferroni over the 3 comparisons with vcb (Eq. 10)" in head
    assert "| vcb (Eq. 10) | vcb | 0.390 [0.360, 0.430] | +0.081 [0.056, 0.105] | – | (reference) |" in body
    assert "| rank | vcb | 0.390 [0.360, 0.430] | +0.081 [0.056, 0.105] | -0.008 [-0.015, -0.001] | resolved alone, not family-wise |" in body
    assert "| -0.013 [-0.021, -0.005] | resolved |" in body and "| +0.002 [-0.004, 0.009] | not resolved |" in body
    assert pool_points(table.drop(columns=[c for c in table if c.startswith("pool_")])) == []  # rows without a pool
    from vcb_lib.plots import sweep_pool_differences

    fig = sweep_pool_differences(table, tmp_path / "pool.png")
    assert (tmp_path / "pool.png").stat().st_size > 0
    left, right = fig.axes
    assert [t.get_text() for t in left.get_yticklabels()] == ["max", "dpo", "rank", "vcb (Eq. 10)"]
    filled, hollow = (c.get_offsets() for c in right.collections[1:3])  # after the error bars: resolved, not resolved
    assert sorted(filled[:, 0].tolist()) == [-0.013, -0.008] and hollow[:, 0].tolist() == [0.002]


# --------------------------------------------------------------------------------------------
# compare_points: family-wise intervals with enough resamples, no silent gaps, points on their own pool
# --------------------------------------------------------------------------------------------


def _points(tmp_path, names, upstream="up"):
    return {n: load_params(SMOKE, {"run.output_root": str(tmp_path), "run.name": n, "run.upstream": upstream})
            for n in names}


def _per_prompt(shift: float, seed: int, n: int = 60) -> pd.Series:
    return pd.Series(np.random.default_rng(seed).normal(size=n) * 0.1 + shift, index=[f"p{i}" for i in range(n)])


@pytest.fixture
def fake_pools(monkeypatch):
    """evaluate.pool_per_prompt from a dict (a callable value is called: it may raise); the pool path
    shared by every point."""
    from vcb_lib.manifest import Artefact
    from vcb_lib.stages import artefacts, evaluate

    values: dict = {}
    monkeypatch.setattr(evaluate, "reference_method", lambda cfg: "vcb")
    monkeypatch.setattr(evaluate, "pool_per_prompt",
                        lambda cfg, policy: values[cfg.run.name]() if callable(values[cfg.run.name]) else values[cfg.run.name])
    monkeypatch.setattr(artefacts, "pool",
                        lambda cfg: Artefact(cfg.upstream_dir / "04_eval" / "pool" / "c.parquet", "04_evaluate", {}))
    return values


def test_bonferroni_intervals_keep_fifty_resamples_beyond_each_bound(tmp_path, monkeypatch, fake_pools):
    """Four points: three comparisons with the first, family-wise level 1 − 0.05/3. Its percentile
    interval is drawn from 6000 resamples (50 beyond each bound; 1000 would leave 8), the per-comparison
    95% one from evaluation.bootstrap; the verdict is the one those resamples give."""
    from vcb_lib import metrics
    from vcb_lib.stages import ablations

    calls, real = [], metrics.paired_difference

    def spy(a, b, *, bootstrap, seed, ci=0.95):
        calls.append((bootstrap, ci))
        return real(a, b, bootstrap=bootstrap, seed=seed, ci=ci)

    monkeypatch.setattr(metrics, "paired_difference", spy)
    points = _points(tmp_path, ["a", "b", "c", "d"])
    fake_pools.update(a=_per_prompt(0.0, 0), b=_per_prompt(0.03, 1), c=_per_prompt(0.08, 2), d=_per_prompt(0.0, 3))
    out = ablations.compare_points(points, log=lambda m: None)
    family = 1 - 0.05 / 3
    boot = points["a"].evaluation.bootstrap
    assert sorted(set(calls)) == sorted({(boot, 0.95), (6000, family)}) and len(calls) == 6
    for bootstrap, ci in calls:
        assert bootstrap * (1 - ci) / 2 >= 50 - 1e-9 or ci == 0.95
    for name in "bcd":
        d = real(fake_pools[name].to_numpy(), fake_pools["a"].to_numpy(), bootstrap=6000, seed=0, ci=family)
        assert out[name]["vs_first_resolved_all"] == d["resolved"]
        assert out[name]["same_pool"] and out[name]["shared_pool"]
    assert out["c"]["vs_first_resolved_all"] and not out["d"]["vs_first_resolved"]
    assert set(out) == set("abcd") and "vs_first" not in out["a"]


def test_a_point_whose_pool_cannot_be_read_is_rebuilt_or_named(tmp_path, fake_pools):
    """A stale or corrupt pool is no silent gap in results.csv: compare_points rebuilds the point
    (``rebuild``) and reads it again; without a rebuild, or when it still cannot be read, it fails
    naming the point."""
    from vcb_lib.manifest import Artefact, ArtefactError
    from vcb_lib.stages import ablations

    points = _points(tmp_path, ["first", "second"])
    stale = ArtefactError(Artefact(tmp_path / "second" / "04_eval" / "pool" / "vcb.parquet", "04_evaluate", {}),
                          "stale", "built for another config")
    state = {"broken": True}

    def second():
        if state["broken"]:
            raise stale
        return _per_prompt(0.05, 1)

    fake_pools.update(first=_per_prompt(0.0, 0), second=second)
    with pytest.raises(ablations.PointPoolError, match="sweep point 'second': its pool cannot be read: .*stale"):
        ablations.compare_points(points, log=lambda m: None)
    lines, rebuilt = [], []

    def rebuild(name):
        rebuilt.append(name)
        state["broken"] = False

    out = ablations.compare_points(points, log=lines.append, rebuild=rebuild)
    assert rebuilt == ["second"] and out["second"]["vs_first"] == pytest.approx(0.05 + float(_per_prompt(0, 1).mean())
                                                                                 - float(_per_prompt(0, 0).mean()))
    assert any("point second: its pool cannot be read" in line and "rebuilding" in line for line in lines)
    state["broken"] = True
    with pytest.raises(ablations.PointPoolError, match="'second'.*even after rebuilding"):
        ablations.compare_points(points, log=lambda m: None, rebuild=lambda name: None)
    fake_pools["first"] = lambda: (_ for _ in ()).throw(ValueError("pool.parquet does not match the pool's rows"))
    with pytest.raises(ablations.PointPoolError, match="sweep point 'first'.*does not match"):
        ablations.compare_points(points, log=lambda m: None)


def test_shared_pool_is_false_for_a_point_that_drew_its_own(tmp_path):
    """A point reads its upstream's pool when it is current there (drawn once by share_sft_evaluation);
    one that drew its own (the upstream folder was busy) keeps it and is marked, whatever the upstream
    holds later."""
    from vcb_lib.manifest import Artefact
    from vcb_lib.stages import ablations, artefacts

    beside = _points(tmp_path, ["p"])["p"]  # upstream tmp/up, point tmp/p
    inside = load_params(SMOKE, {"run.output_root": str(tmp_path / "up" / "sweeps" / "abl"), "run.name": "p",
                                 "run.upstream": "../.."})  # a sweep inside its base run, the upstream
    assert beside.upstream_dir == inside.upstream_dir == tmp_path / "up"
    assert not ablations.shared_pool(beside) and not ablations.shared_pool(inside)  # nothing drawn yet: neither
    for cfg in (beside, inside):
        mine = artefacts.own(cfg, artefacts.pool(cfg))
        theirs = Artefact(cfg.upstream_dir / mine.path.relative_to(cfg.run_dir), mine.stage, mine.key)
        if not theirs.current():  # the upstream's pool, drawn once (the second point finds it there)
            theirs.path.parent.mkdir(parents=True)
            theirs.path.write_bytes(b"pool")
            theirs.seal()
        assert artefacts.pool(cfg).path == theirs.path and ablations.shared_pool(cfg)
        mine.path.parent.mkdir(parents=True)
        mine.path.write_bytes(b"own pool")  # drawn while the upstream was busy
        assert not ablations.shared_pool(cfg) and ablations.pool_file(cfg) == mine.path
    assert not ablations.shared_pool(load_params(SMOKE, {"run.output_root": str(tmp_path), "run.name": "q"}))


def test_pool_points_mark_a_point_scored_on_its_own_pool():
    from vcb_lib.report import pool_points

    base = {"method": "vcb", "pool_gold": 0.39, "pool_gold_lo": 0.36, "pool_gold_hi": 0.43, "pool_vs_sft": 0.081,
            "pool_vs_sft_lo": 0.056, "pool_vs_sft_hi": 0.105, "slope": 0.01, "misalignment": 0.42}
    table = pd.DataFrame([
        base | {"label": "g0.1", "vs_first": float("nan"), "shared_pool": True},
        base | {"label": "g1", "vs_first": -0.008, "vs_first_lo": -0.015, "vs_first_hi": -0.001, "vs_first_resolved": True,
                "vs_first_resolved_all": False, "same_pool": False, "shared_pool": False},
        base | {"label": "g2", "vs_first": 0.002, "vs_first_lo": -0.004, "vs_first_hi": 0.009, "vs_first_resolved": False,
                "vs_first_resolved_all": False, "same_pool": True, "shared_pool": True}])
    head, body, note = pool_points(table)
    assert "paired over prompts" in head and "same π_sft candidates" not in head
    assert "| g1 † | vcb |" in body and "| g2 | vcb |" in body and "| g0.1 | vcb |" in body
    assert note.startswith("† scored on a pool of its own") and "upstream folder was busy" in note and ": g1." in note
    shared = table.assign(shared_pool=True, same_pool=True)
    assert len(pool_points(shared)) == 2 and "same π_sft candidates" in pool_points(shared)[0]


def test_run_sweep_marks_a_point_on_its_own_pool_and_rebuilds_a_stale_one(tmp_path, monkeypatch):
    """run_sweep's wiring, its stages faked: the first point draws the shared pool in the upstream; the
    second finds the upstream folder busy and draws its own (logged; results.csv: shared_pool False,
    same_pool False); the third's pool is stale when the points are compared: it is rerun (stages 03-04)
    and compared, no NaN left."""
    from vcb_lib import runner
    from vcb_lib.manifest import Artefact, ArtefactError
    from vcb_lib.stages import ablations, artefacts, evaluate

    path = write(tmp_path, "name: abl\nbase: BASE\ngrid: {training.gamma: [0.1, 1.0, 2.0]}\n")
    over = [f"run.output_root={tmp_path / 'out'}"]
    runs: list[str] = []

    def fake_run(params, overrides, *, only, log):
        cfg = load_params(params, overrides)
        runs.append(cfg.run.name)
        if cfg.run.name == "gamma-1.0":  # stage 04 with the upstream busy: a pool of its own
            own = artefacts.own(cfg, artefacts.pool(cfg)).path
            own.parent.mkdir(parents=True, exist_ok=True)
            own.write_bytes(b"own pool")

    def share(cfg, log):
        if cfg.run.name == "gamma-1.0":
            log("π_sft's evaluation stays per point: busy")
            return False
        mine = artefacts.own(cfg, artefacts.pool(cfg))
        theirs = Artefact(cfg.upstream_dir / mine.path.relative_to(cfg.run_dir), mine.stage, mine.key)
        if not theirs.current():
            theirs.path.parent.mkdir(parents=True, exist_ok=True)
            theirs.path.write_bytes(b"pool")
            theirs.seal()
        return True

    def per_prompt(cfg, policy):
        if cfg.run.name == "gamma-2.0" and runs.count("gamma-2.0") < 2:
            raise ArtefactError(Artefact(cfg.run_dir / "04_eval" / "pool" / "vcb.parquet", "04_evaluate", {}), "corrupt",
                                "it does not match its checksum")
        return _per_prompt(cfg.training.gamma / 10, 0)

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(ablations, "point_metrics", lambda cfg: None)
    monkeypatch.setattr(ablations, "upstream_current", lambda cfg: True)
    monkeypatch.setattr(ablations, "share_sft_evaluation", share)
    monkeypatch.setattr(ablations, "record_point", lambda cfg, name, label, metrics, **kw: {"point": name, "label": label,
                                                                                           "method": "vcb"})
    monkeypatch.setattr(evaluate, "read_metrics", lambda cfg: {})
    monkeypatch.setattr(evaluate, "reference_method", lambda cfg: "vcb")
    monkeypatch.setattr(evaluate, "pool_per_prompt", per_prompt)
    lines: list[str] = []
    table = run_sweep(path, over, log=lines.append)
    assert runs == ["gamma-0.1", "gamma-1.0", "gamma-2.0", "gamma-2.0"]  # the stale one rerun once
    assert any("gamma-1.0: the upstream folder is busy" in line and "shared_pool = False" in line for line in lines)
    assert any("point gamma-2.0: its pool cannot be read" in line and "rebuilding" in line for line in lines)
    saved = pd.read_csv(load_sweep(path, over).root() / "results.csv")
    for t in (table, saved):
        assert list(t.shared_pool) == [True, False, True]
        assert list(t.same_pool.iloc[1:]) == [False, True] and t.vs_first.iloc[1:].notna().all()
    monkeypatch.setattr(evaluate, "pool_per_prompt", lambda cfg, policy: (_ for _ in ()).throw(
        ValueError("pool.parquet does not match the pool's rows")) if cfg.run.name == "gamma-2.0" else _per_prompt(0, 0))
    with pytest.raises(ablations.PointPoolError, match="sweep point 'gamma-2.0'.*even after rebuilding"):
        run_sweep(path, over, log=lambda m: None)
