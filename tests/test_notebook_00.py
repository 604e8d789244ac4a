"""Notebook 00 (theory) runs headless on params/smoke.yaml and the numbers it writes hold."""
import json

import numpy as np
import pytest

from vcb_lib.config import PROJECT_ROOT, load_params

NOTEBOOK = PROJECT_ROOT / "notebooks" / "00_theory.ipynb"


@pytest.mark.notebook
def test_theory_notebook_runs_and_its_checks_hold(tmp_path, smoke_params):
    import papermill

    overrides = [f"run.output_root={tmp_path}"]
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / NOTEBOOK.name),
        parameters={"params_path": str(smoke_params), "overrides": overrides},
        cwd=str(NOTEBOOK.parent), kernel_name="python3", progress_bar=False,
    )
    cfg = load_params(smoke_params, overrides)
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
