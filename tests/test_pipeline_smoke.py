"""The smoke tier: every notebook runs headless through the runner on params/smoke.yaml (tiny
random model), once per test session, and the numbers each stage writes hold."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from vcb_lib.config import PROJECT_ROOT, load_params
from vcb_lib.data import CANDIDATE_COLUMNS
from vcb_lib.runner import run

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run every notebook once; return the resolved config of the run."""
    params = PROJECT_ROOT / "params" / "smoke.yaml"
    overrides = [f"run.output_root={tmp_path_factory.mktemp('outputs')}"]
    run(params, overrides, log=lambda m: None)
    return load_params(params, overrides + ["ablation.interactive=false"])


def test_every_notebook_was_executed(smoke):
    executed = sorted(p.name for p in (smoke.run_dir / "notebooks").glob("*.ipynb"))
    assert executed == sorted(p.name for p in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert (smoke.run_dir / "config.yaml").is_file()


def test_theory_checks_hold(smoke):
    cfg = smoke
    stage = cfg.run_dir / "00_theory"
    checks = json.loads((stage / "checks.json").read_text())
    tol, fit_tol = cfg.theory.tolerance, cfg.theory.fit_tolerance

    assert checks["passed"] is True and all(checks["checks"].values()), checks["checks"]
    assert checks["theorem1_max_abs_err"] <= tol
    assert set(checks["psi_forms_max_abs_err"]) >= {"rrhf", "slic", "dpo", "vcb", "kl_eq2_vs_dpo"}
    assert all(err <= tol for err in checks["psi_forms_max_abs_err"].values()), checks["psi_forms_max_abs_err"]
    assert checks["vcb_tabular_vs_eq15_max_abs_err"] <= fit_tol
    assert checks["eq12_max_abs_err"] <= fit_tol
    assert checks["ipo_tabular_vs_closed_form_max_abs_err"] <= fit_tol

    fig1 = {m: np.array(p) for m, p in checks["figure1"].items()}
    assert set(fig1) >= {"sft", "rrhf", "slic", "dpo", "ipo", "vcb", "vcb_eq15"}
    for method, p in fig1.items():
        assert p.shape == (3,) and np.isclose(p.sum(), 1.0) and np.all(p >= 0), method
    p1, p2, p3 = fig1["vcb"]
    assert p2 > p1 and p3 > p1 and abs(p3 - p2) < abs(p2 - p1) / 4  # VCB: y2 ≈ y3 ≫ y1
    d1, d2, d3 = fig1["dpo"]
    assert abs(d2 - d1) < abs(d3 - d2)  # DPO: y2 closer to y1 than to y3

    assert all(checks["value_blindness"][m] == 0.0 for m in ("rrhf", "slic", "dpo", "ipo"))
    assert checks["misalignment"]["r_ordered"] == 0.0 and checks["misalignment"]["reversed"] == 1.0
    for png in ("theorem1.png", "eq12_proportionality.png", "figure1.png", "figure1_trajectories.png"):
        assert (stage / png).stat().st_size > 0, png


def test_reward_model_stage(smoke):
    stage = smoke.run_dir / "01_models"
    accuracy = json.loads((stage / "metrics.json").read_text())
    assert 0.0 <= accuracy["accuracy"] <= 1.0 and accuracy["heldout_pairs"] >= 1 and accuracy["train_pairs"] >= 1
    assert (stage / "reward_model" / "config.json").is_file()
    assert (stage / "sft" / "model.safetensors").is_file()  # the SFT stage ran for real (models.sft: true)
    pairs = pd.read_parquet(stage / "pairs.parquet")
    assert (pairs.gold_chosen > pairs.gold_rejected).all()  # chosen = gold-preferred, ties dropped


def test_candidate_stage(smoke):
    table = pd.read_parquet(smoke.run_dir / "02_candidates" / "candidates.parquet")
    s = smoke.sampling
    assert set(CANDIDATE_COLUMNS) <= set(table.columns) and "gold" in table
    assert table.prompt_id.nunique() == s.num_prompts and len(table) == s.num_prompts * s.n
    assert table.reward.notna().all() and np.isfinite(table.ref_logp).all()
    assert (table.n_tokens <= s.max_new_tokens).all()
    metrics = json.loads((smoke.run_dir / "02_candidates" / "metrics.json").read_text())
    assert metrics["candidates"] == len(table)


def test_training_stage(smoke):
    from vcb_lib.stages.artefacts import method_dir_name

    metrics = json.loads((smoke.run_dir / "03_train" / "metrics.json").read_text())
    assert sorted(metrics) == sorted(smoke.training.methods)
    for method in smoke.training.methods:
        folder = smoke.run_dir / "03_train" / method_dir_name(smoke, method)
        rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, smoke.training.max_steps + 1))
        assert all(np.isfinite(r["loss"]) for r in rows)
        assert (folder / "final" / "model.safetensors").is_file()
        assert metrics[method]["steps"] == smoke.training.max_steps and metrics[method]["peak_rss_mb"] > 0
        # training.log_with's default: each method is one tensorboard run under <run>/tensorboard/
        assert list((smoke.run_dir / "tensorboard" / "03_train" / folder.name).glob("events.out.tfevents.*")), method


def test_lora_method_in_the_smoke_tier(smoke):
    """Issue 22: smoke.yaml trains DPO with LoRA adapters (training.lora.methods: [dpo]); its final/ is
    the merged model beside final/adapter/, and stage 04 sampled and scored it like every policy."""
    from vcb_lib.stages.artefacts import method_dir_name

    assert smoke.training.lora_for("dpo") is not None and smoke.training.lora_for("vcb") is None
    folder = smoke.run_dir / "03_train" / method_dir_name(smoke, "dpo")
    assert folder.name.endswith(f"-lora-r{smoke.training.lora.r}-seed{smoke.run.seed}")
    assert json.loads((folder / "training_config.json").read_text())["lora"]["r"] == smoke.training.lora.r
    assert (folder / "final" / "model.safetensors").is_file() and (folder / "final" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((smoke.run_dir / "03_train" / "metrics.json").read_text())["dpo"]["final_dir"].endswith(f"{folder.name}/final")
    metrics = json.loads((smoke.run_dir / "04_eval" / "metrics.json").read_text())
    assert "dpo" in metrics["pool"]["methods"] and math.isfinite(metrics["reward_kl"]["dpo"]["kl"])


def test_online_methods_in_the_smoke_tier(smoke):
    """Issue 20: every on-policy method trains 2 rounds of its own samples through stage 03, lands
    in 03_train/<method>/ like the offline ones, is scored on the pool and sampled by stage 04, and
    the report puts its compute beside the offline methods'."""
    from vcb_lib.policy_gradient import OnlineMethod
    from vcb_lib.stages.artefacts import method_dir_name

    o = smoke.training.online
    assert {m.value for m in OnlineMethod} <= set(smoke.training.methods) and o.rounds == 2
    trained = json.loads((smoke.run_dir / "03_train" / "metrics.json").read_text())
    dt = len(pd.read_parquet(smoke.run_dir / "02_candidates" / "candidates.parquet"))
    for method in smoke.training.methods:
        c = trained[method]["compute"]
        assert c["tokens_trained"] > 0
        if method not in {m.value for m in OnlineMethod}:
            assert (c["policy_samples"], c["sft_samples"]) == (0, dt)
            continue
        assert (c["policy_samples"], c["sft_samples"]) == (o.rounds * o.prompts_per_round * o.n, 0)
        folder = smoke.run_dir / "03_train" / method_dir_name(smoke, method)
        rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2] and all(np.isfinite(r["objective/kl"]) for r in rows)
        for r in (1, 2):
            table = pd.read_parquet(folder / "rollouts" / f"round-000{r}.parquet")
            assert len(table) == o.prompts_per_round * o.n and np.isfinite(table[["reward", "old_logp", "ref_logp"]]).all().all()
    metrics = json.loads((smoke.run_dir / "04_eval" / "metrics.json").read_text())
    assert {m.value for m in OnlineMethod} <= set(metrics["pool"]["methods"]) & set(metrics["reward_kl"])
    report = (smoke.run_dir / "report.md").read_text()
    assert "beside the compute each policy used" in report and "| ppo | own samples (online) |" in report


def test_cut_in_the_smoke_tier(smoke, monkeypatch):
    """Issue 21: CUT trains through stage 03 on D_t with a judgment per candidate (judged.parquet in its
    folder), logs its token-level metrics, is evaluated like every method, notebook 05 looked at the
    tokens its rule marks (an artefact: asked again, it loads no model), and the report has its section."""
    from vcb_lib import models
    from vcb_lib.stages import analysis
    from vcb_lib.stages.artefacts import method_dir_name

    assert "cut" in smoke.training.methods
    folder = smoke.run_dir / "03_train" / method_dir_name(smoke, "cut")
    judged = pd.read_parquet(folder / "judged.parquet")
    dt = pd.read_parquet(smoke.run_dir / "02_candidates" / "candidates.parquet")
    assert list(judged.response) == list(dt.response) and set(judged.judgment_source) == {"whitebox-sentiment"}
    assert (judged.positive_input == judged.model_input).all()  # cut_positive none: the evaluation's template
    assert all(j == "The review is clearly positive and uses no negative words." for j, p in
               zip(judged.judgment, judged.judgment_positive) if p)
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["cut/detected"] <= 1 and np.isfinite(r["cut/align_n_nll"]) for r in rows)
    metrics = json.loads((smoke.run_dir / "04_eval" / "metrics.json").read_text())
    assert "cut" in metrics["pool"]["methods"] and "vcb-vs-cut" in metrics["pool"]["paired"]
    marks = json.loads((smoke.run_dir / "figures" / "cut_marks.json").read_text())
    negatives = int((~judged.judgment_positive).sum())
    assert marks["summary"]["candidates"] == min(negatives, 256) and marks["summary"]["judged_candidates"] == len(dt)
    assert all(len(e["tokens"]) == len(e["marked"]) == len(e["evidence"]) for e in marks["examples"])
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: pytest.fail("cut_marks recomputed a current artefact"))
    assert analysis.cut_marks(smoke) == marks
    report = (smoke.run_dir / "report.md").read_text()
    assert "## Judgments vs reward values: CUT" in report and "vcb − cut = " in report


def test_evaluation_and_report(smoke):
    metrics = json.loads((smoke.run_dir / "04_eval" / "metrics.json").read_text())
    for key in ("win_rate", "reward_kl", "misalignment_rate", "diversity", "length", "ood_win_rate", "rm_accuracy"):
        assert key in metrics, key
    baselines = {"sft"} | set(smoke.training.methods) - {"vcb"}
    assert set(metrics["win_rate"]) == baselines and set(metrics["ood_win_rate"]) == baselines
    policies = baselines | {"vcb"}
    assert set(metrics["reward_kl"]) == set(metrics["diversity"]) == set(metrics["length"]) == policies
    assert abs(metrics["reward_kl"]["sft"]["kl"]) < 1e-4  # π_sft against itself: log-ratios are 0
    for m, w in metrics["win_rate"].items():
        assert abs(w["win"] + w["tie"] + w["lose"] - 1) < 1e-9 and w["win_rate_ci"][0] <= w["win_rate"] <= w["win_rate_ci"][1]
    samples = pd.read_parquet(smoke.run_dir / "04_eval" / "vcb" / "samples-test.parquet")
    assert len(samples) == smoke.evaluation.num_prompts * smoke.evaluation.samples_per_prompt
    curve = metrics["reward_kl_curve"]  # Fig. 5 along training: π_sft, the step-1 snapshot, the final model
    assert set(curve) == set(smoke.training.methods)
    for method, points in curve.items():
        assert [p["step"] for p in points] == [0, 1, 2], method
        assert abs(points[0]["kl"]) < 1e-4  # π_sft's samples under π_sft (sampler vs forward-pass log-probs)
        assert all(math.isfinite(p["kl"]) and math.isfinite(p["reward"]) for p in points)
    assert metrics["judge_win_rate"] == {}  # evaluation.judge is off
    pool = metrics["pool"]  # the shared held-out pool: every policy scored on the same candidates
    e = smoke.evaluation
    assert (pool["prompts"], pool["candidates_per_prompt"], pool["reference"]) == (e.pool_prompts, e.pool_candidates, "vcb")
    assert set(pool["methods"]) == policies and set(pool["paired"]) == {f"vcb-vs-{m}" for m in baselines}
    for name, m in pool["methods"].items():
        assert {"gold", "gold_ci", "rm", "rm_ci", "ess_mean", "slope", "slope_ci", "spearman", "misalignment_rate"} <= set(m)
        assert 1.0 <= m["ess_mean"] <= e.pool_candidates + 1e-9 and m["gold_ci"][0] <= m["gold"] <= m["gold_ci"][1]
        assert (m["misalignment_rate"] is None) == (name == "sft")  # π_sft is the reference, not scored against itself
    assert pool["methods"]["sft"]["ess_mean"] == pytest.approx(e.pool_candidates)  # π/π_sft = 1: every weight equal
    for d in pool["paired"].values():
        assert d["ci"][0] <= d["gold_diff"] <= d["ci"][1] and d["resolved"] == (d["ci"][0] > 0 or d["ci"][1] < 0)
    assert set(metrics["dt_reward"]) == {"name", "heldout_accuracy", "heldout_pairs", "spearman_gold_on_dt"}
    assert metrics["dt_reward"]["name"] == "learned"
    json.dumps(metrics, allow_nan=False)
    report = (smoke.run_dir / "report.md").read_text()
    assert "Along training" in report
    assert "Scale, honestly" in report and "Table 2" in report
    assert report.index("## Resolution") < report.index("## Table 2") and "What scored D_t" in report
    for png in ("table2_win_rates.png", "fig5_reward_vs_kl.png", "fig8_lengths.png"):
        assert (smoke.run_dir / "figures" / png).stat().st_size > 0


def test_ablation_sweep_shares_the_run_upstream(smoke):
    """Notebook 06 ran params/sweeps/smoke.yaml: one row per point, each point trained only VCB on
    this run's D_t (no upstream of its own), and the figure and report section exist."""
    root = smoke.run_dir / "sweeps" / "sweep-smoke"
    results = pd.read_csv(root / "results.csv")
    assert list(results.label) == ["0.5", "w/o"] and set(results.method) == {"vcb"}
    assert list(results["training.gamma"].astype(float)) == [0.5, smoke.training.gamma]
    assert list(results["training.reduction"]) == ["logsumexp", "mean"]
    for r in results.itertuples():
        assert abs(r.win + r.tie + r.lose - 1) < 1e-9 and r.win_rate_lo <= r.win_rate <= r.win_rate_hi
        point = json.loads((root / r.point / "point.json").read_text())
        assert point["win_rate"] == pytest.approx(r.win_rate)
        assert not (root / r.point / "02_candidates").exists()  # read from the run's own upstream
        assert (root / r.point / "notebooks" / "03_train.ipynb").is_file()
    assert not list(root.glob("upstream-*"))
    metrics = json.loads((smoke.run_dir / "06_ablations" / "metrics.json").read_text())
    assert [row["label"] for row in metrics["gamma, reduction"]] == ["0.5", "w/o"]
    assert (smoke.run_dir / "figures" / "fig6_fig7_ablations.png").stat().st_size > 0
    assert "Figs. 6-7 analogues" in (smoke.run_dir / "report.md").read_text()


def test_value_aware_sweep_and_methods_in_the_smoke_tier(smoke):
    """Issue 19: the smoke tier trains every value-aware relative, and notebook 06 ran
    params/sweeps/smoke_value_aware.yaml (VCB with ranks, InfoNCA) on the run's D_t; the report puts
    their reward-vs-KL points side by side."""
    from vcb_lib.losses import LossType

    assert {lt.value for lt in LossType if lt.uses_reward_values} <= set(smoke.training.methods)
    root = smoke.run_dir / "sweeps" / "sweep-smoke-value-aware"
    results = pd.read_csv(root / "results.csv")
    assert list(results.label) == ["vcb rank", "infonca"] and list(results.method) == ["vcb", "infonca"]
    assert list(results["training.normalize"]) == ["rank", "prompt_std"]
    assert np.isfinite(results[["reward", "kl", "sft_reward"]].to_numpy()).all()
    assert not list(root.glob("upstream-*")) and not (root / "infonca" / "02_candidates").exists()
    report = (smoke.run_dir / "report.md").read_text()
    section = report.split("### normalize, methods")[1]
    assert "Reward vs KL, the points side by side" in section and "| infonca | infonca |" in section
    # both points scored on the run's own pool (notebook 04 drew it), InfoNCA paired with the first point
    assert "On the held-out pool (every point scored on the same π_sft candidates" in section
    assert results.same_pool.iloc[1] and results.vs_first_lo.iloc[1] <= results.vs_first.iloc[1] <= results.vs_first_hi.iloc[1]
    assert not (root / "infonca" / "04_eval" / "sft").exists() and not (root / "infonca" / "04_eval" / "pool" / "candidates.parquet").exists()
    # the run trained InfoNCA with the same key: the point reused it (no training, samples or pool scores of its own)
    assert not list((root / "infonca" / "03_train").glob("infonca-*")) and not (root / "infonca" / "04_eval" / "infonca").exists()
    run_metrics = json.loads((smoke.run_dir / "04_eval" / "metrics.json").read_text())
    assert results.pool_gold.iloc[1] == pytest.approx(run_metrics["pool"]["methods"]["infonca"]["gold"])
    assert list((root / "vcb-rank" / "03_train").glob("vcb-*normalizerank*"))  # ranks: a key of its own, trained here


def test_panel_runs_a_point_headless(smoke):
    """The notebook-06 panel driven without a browser: set the widgets, click Run, wait; the point
    is recorded (config, point.json, plot data, PNG) and a second click on the same settings reads
    it back instead of training again."""
    from vcb_lib.widgets import AblationPanel

    params = PROJECT_ROOT / "params" / "smoke.yaml"
    panel = AblationPanel(params, [f"run.output_root={smoke.run.output_root}"])
    assert panel.values()["training.gamma"] == smoke.training.gamma  # the log slider's 0.050119 reads as 0.05
    panel.gamma.value, panel.method.value = 0.2, "dpo"
    panel.run_button.click()
    panel.wait(timeout=600)
    table = panel.plot_data()
    assert len(table) == 1 and table.method[0] == "dpo"
    row = table.iloc[0]
    assert row["training.gamma"] == pytest.approx(0.2, rel=1e-3) and row["training.methods"] == ["dpo"]
    assert 0 <= row.win_rate_lo <= row.win_rate <= row.win_rate_hi <= 1 and np.isfinite(row.kl)
    folder = smoke.run_dir / "panel" / row.point
    assert json.loads((folder / "point.json").read_text())["win_rate"] == pytest.approx(row.win_rate)
    assert (folder / "03_train").is_dir() and not (folder / "02_candidates").exists()  # shares the run's D_t
    assert panel.image.value[:8] == b"\x89PNG\r\n\x1a\n" and "dpo" in panel.table.value
    assert panel.progress.value == panel.progress.max and not panel.run_button.disabled
    mtime = (folder / "point.json").stat().st_mtime
    panel.run_button.click()
    panel.wait(timeout=60)
    assert len(panel.plot_data()) == 1 and (folder / "point.json").stat().st_mtime == mtime
    saved = pd.read_csv(panel.save())
    assert list(saved.point) == [row.point]


def _close(a, b, path="metrics"):
    """Same keys, same values within float tolerance (rel 1e-6), recursively."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_panel_and_runner_give_the_same_metrics(smoke):
    """One point, two fronts: the sweep ran γ = 0.5 (VCB) through the runner's notebooks 03-04;
    the panel runs the same point in a thread through stages.ablations. Same metrics.json."""
    from vcb_lib.widgets import AblationPanel

    params = PROJECT_ROOT / "params" / "smoke.yaml"
    panel = AblationPanel(params, [f"run.output_root={smoke.run.output_root}"])
    panel.gamma.value, panel.method.value = 0.5, "vcb"
    panel.run_button.click()
    panel.wait(timeout=600)
    point = panel.plot_data().iloc[-1].point
    by_panel = json.loads((smoke.run_dir / "panel" / point / "04_eval" / "metrics.json").read_text())
    by_runner = json.loads((smoke.run_dir / "sweeps" / "sweep-smoke" / "gamma-0.5" / "04_eval" / "metrics.json").read_text())
    _close(by_runner, by_panel)


def test_stale_and_damaged_artefacts_are_refused_or_rebuilt(smoke, tmp_path):
    """Issue #16, cases 2-3: a config change followed by stage 03 alone is refused, naming the
    stale stage and the key, and deletes nothing; a truncated D_t is refused by stage 03 and
    rebuilt by stage 02 (from its shards); a deleted final model is retrained by stage 03."""
    import shutil
    import warnings

    from vcb_lib.manifest import ArtefactError
    from vcb_lib.stages import artefacts, generate, train

    shutil.copytree(smoke.run_dir, tmp_path / "copy", symlinks=True)
    over = [f"run.output_root={tmp_path}", "run.name=copy", "ablation.interactive=false", "training.methods=[vcb]"]
    cfg = load_params(PROJECT_ROOT / "params" / "smoke.yaml", over)
    vcb = artefacts.method(cfg, "vcb")
    assert vcb.current()
    hotter = load_params(PROJECT_ROOT / "params" / "smoke.yaml", over + ["sampling.temperature=0.5"])
    with pytest.raises(ArtefactError, match=r"candidates.parquet is stale.*sampling.temperature: 1.0 -> 0.5.*02_generate"):
        train.run(hotter, log=lambda m: None)
    assert vcb.current()  # the trained policy of the old config is still there

    table = artefacts.candidates(cfg).path
    good = table.read_bytes()
    table.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtefactError, match="candidates.parquet is corrupt"):
        train.run(cfg, log=lambda m: None)
    messages = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shards are reused: a moved run folder is still the same run
        generate.run(cfg, log=messages.append)
    assert any("corrupt" in m for m in messages) and table.read_bytes() == good

    (vcb.path / "final" / "model.safetensors").unlink()
    assert vcb.status()[0] == "corrupt"
    train.run(cfg, log=lambda m: None)
    assert vcb.current() and (vcb.path / "final" / "model.safetensors").is_file()


def test_training_seeds_replicate_methods_and_measure_their_spread(smoke, tmp_path):
    """training.seeds = [0, 1]: each method gets a second replicate on the same D_t, the pool scores
    it, and metrics["pool"]["seeds"] says how far the training seed moves each comparison."""
    import shutil

    from vcb_lib import report
    from vcb_lib.stages import artefacts, evaluate, train

    shutil.copytree(smoke.run_dir, tmp_path / "copy", symlinks=True)
    over = [f"run.output_root={tmp_path}", "run.name=copy", "ablation.interactive=false",
            "training.methods=[vcb, dpo]", "training.seeds=[0, 1]"]
    cfg = load_params(PROJECT_ROOT / "params" / "smoke.yaml", over)
    summaries = train.run(cfg, log=lambda m: None)
    assert sorted(summaries) == ["dpo", "dpo-seed1", "vcb", "vcb-seed1"]
    assert artefacts.method(cfg, "vcb", 1).path.name.endswith("-seed1")
    seed0 = load_policy_state(artefacts.method(cfg, "vcb", 0).path / "final")
    seed1 = load_policy_state(artefacts.method(cfg, "vcb", 1).path / "final")
    assert any((seed0[k] - seed1[k]).abs().max() > 0 for k in seed0)  # another seed, another data order
    metrics = evaluate.run(cfg, log=lambda m: None)
    spread = metrics["pool"]["seeds"]
    assert spread["seeds"] == [0, 1] and set(spread["paired"]) == {"vcb-vs-dpo", "vcb-vs-sft"}
    for v in spread["paired"].values():
        assert len(v["diffs"]) == 2 and v["mean"] == pytest.approx(sum(v["diffs"]) / 2)
        assert v["ci_seeds"][0] <= v["mean"] <= v["ci_seeds"][1] and v["se_prompts"] > 0
    assert set(metrics["pool"]["methods"]) == {"sft", "vcb", "dpo"}  # the main replicates
    text = "\n".join(report.pool_sections(metrics))
    assert "Training-seed variance (seeds [0, 1])" in text
    json.dumps(metrics, allow_nan=False)


def load_policy_state(folder):
    from vcb_lib.models import load_policy

    return load_policy(str(folder)).state_dict()
