"""The ablation panel of notebook 06: ipywidgets for γ, λ (and the mean "w/o" reduction), the
sampling temperature, the loss and n; Run trains and evaluates one short point in a worker thread
(the kernel stays responsive) through the same stage functions as notebooks 01-04
(``stages.ablations.build_upstream`` / ``run_point``); finished points accumulate in a table drawn live
against π_sft (win rate with its bootstrap interval, reward vs KL) and saved with Save.

Points land in ``<output_root>/<panel.name>/<point>/`` like sweep points: one upstream (π_sft,
reward model, D_t) per distinct sampling setting, the base run's when it is current; a point
finished before (same config) is read back instead of rerun.
"""
from __future__ import annotations

import threading
import traceback
from pathlib import Path

import ipywidgets as W

from vcb_lib.config import load_params, methods, parse_override, resolve_path
from vcb_lib.io import folder_lock
from vcb_lib.runner import thread_limit
from vcb_lib.stages import ablations
from vcb_lib.stages.evaluate import reference_method
from vcb_lib.sweep import shared_upstream


def _two_digits(x: float) -> float:
    """Log sliders move in steps of the exponent (γ = 0.05 shows as 10^-1.30 = 0.050119): keep two
    significant digits, so the untouched panel is the params file's own point."""
    return float(f"{x:.2g}")


class AblationPanel:
    """``AblationPanel(params_path, overrides).widget`` is what the notebook displays."""

    def __init__(self, params_path: str | Path, overrides: list[str] | None = None, *, name: str = "panel"):
        self.params_path, self.overrides = str(params_path), list(overrides or [])
        self.base = load_params(self.params_path, self.overrides)
        self.output_root = str(self.base.run_dir / name)  # <run>/panel/: the run's own points
        t, s = self.base.training, self.base.sampling
        style = {"description_width": "110px"}
        self.gamma = W.FloatLogSlider(value=t.gamma, base=10, min=-3, max=0.5, step=0.05, description="γ (Eq. 9)", style=style)
        self.lam = W.FloatLogSlider(value=t.lam, base=10, min=-1, max=1, step=0.05, description="λ (Eq. 20)", style=style)
        self.reduction = W.Dropdown(options=[("logsumexp", "logsumexp"), ("mean (w/o)", "mean")], value=t.reduction,
                                    description="aggregation", style=style)
        self.temperature = W.FloatSlider(value=s.temperature, min=0.1, max=1.5, step=0.05, description="temperature", style=style)
        self.method = W.Dropdown(options=list(methods()), value=reference_method(self.base),
                                 description="loss", style=style)
        self.n = W.IntSlider(value=s.n, min=2, max=16, description="n candidates", style=style)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.save_button = W.Button(description="Save table", icon="save")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="idle")
        self.status = W.HTML()
        self.image = W.Image(format="png")
        self.table = W.HTML()
        self.results: list[dict] = []
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self.run_button.on_click(lambda _: self.run())
        self.save_button.on_click(lambda _: self.save())
        controls = W.VBox([self.method, self.gamma, self.lam, self.reduction, self.temperature, self.n,
                           W.HBox([self.run_button, self.save_button]), self.progress, self.status],
                          layout=W.Layout(min_width="440px", flex="0 0 auto"))
        self.image.layout = W.Layout(max_width="760px")
        self.widget = W.VBox([W.HBox([controls, self.image]), self.table])

    def values(self) -> dict:
        """The panel's settings as config overrides."""
        return {"training.methods": [self.method.value], "training.gamma": _two_digits(self.gamma.value),
                "training.lam": _two_digits(self.lam.value), "training.reduction": self.reduction.value,
                "sampling.temperature": round(self.temperature.value, 4), "sampling.n": self.n.value}

    def point_name(self, values: dict) -> str:
        return (f"{values['training.methods'][0]}-g{values['training.gamma']:g}-l{values['training.lam']:g}"
                f"-{values['training.reduction']}-T{values['sampling.temperature']:g}-n{values['sampling.n']}")

    def run(self) -> None:
        """Start one point in a worker thread (ignored while one is running)."""
        if self._thread is not None and self._thread.is_alive():
            self.status.value = "a point is already running"
            return
        values = self.values()
        self.run_button.disabled, self.error = True, None
        self._thread = threading.Thread(target=self._run_point, args=(values,), daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the running point ends (tests, scripts)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the point did not finish in {timeout} s")
        if self.error:
            raise RuntimeError(f"the point failed:\n{self.error}")

    def _config(self, values: dict, **run):
        overrides = dict(parse_override(o) for o in self.overrides) | values | \
            {"run.output_root": self.output_root} | {f"run.{k}": v for k, v in run.items()}
        return load_params(self.params_path, overrides)

    def _run_point(self, values: dict) -> None:
        name = self.point_name(values)
        stages = ["upstream"] + [f"train {m}" for m in values["training.methods"]] + ["evaluate"]
        self.progress.max, self.progress.value = len(stages), 0

        def step(stage: str) -> None:
            self.progress.value = stages.index(stage) if stage in stages else self.progress.value
            self.progress.description = stage
            self.status.value = f"<b>{name}</b>: {stage} ..."

        try:
            cfg = self._config(values, name=name)
            record = ablations.point_metrics(cfg)
            if record is None:
                cfg = self._config(values, name=name, upstream=shared_upstream(self.base, cfg))
                step("upstream")
                with thread_limit(cfg.run.threads):  # run.threads: this kernel's torch and the trainers it launches
                    if not ablations.upstream_current(cfg):
                        with folder_lock(ablations.upstream_config(cfg).run_dir):
                            ablations.build_upstream(cfg, log=lambda line: None)
                    ablations.share_sft_evaluation(cfg, log=lambda line: None)
                    with folder_lock(cfg.run_dir):  # one writer per point folder
                        metrics = ablations.run_point(cfg, log=lambda line: None, step=step)
                        record = ablations.record_point(cfg, name, name, metrics, **values)
            self.results = [r for r in self.results if r["point"] != name] + [record]
            self.progress.value, self.progress.description = self.progress.max, "done"
            exact = f" (exact; {record['regret']:.3f} reward below the optimum at this KL)" if record.get("exact") else ""
            self.status.value = f"<b>{name}</b>: win rate over π_sft {record['win_rate']:.2f}, KL {record['kl']:.2f}{exact}"
            self._draw()
        except Exception:  # shown in the panel; the kernel keeps running
            self.error = traceback.format_exc()
            self.progress.description = "failed"
            self.status.value = f"<b>{name}</b> failed:<pre>{self.error[-2000:]}</pre>"
        finally:
            self.run_button.disabled = False

    def plot_data(self):
        """The table the live plots draw: one row per finished point (on the exact tier also its regret
        at matched KL and its KL to π_opt, exact)."""
        import pandas as pd

        exact = ["regret", "kl_to_opt"] if any(r.get("exact") for r in self.results) else []
        columns = ["point", "label", "method", "win", "tie", "lose", "win_rate", "win_rate_lo", "win_rate_hi",
                   "reward", "reward_se", "kl", "kl_se", "sft_reward", *exact, *self.values()]
        return pd.DataFrame([{c: r.get(c) for c in columns} for r in self.results], columns=columns)

    def _draw(self) -> None:
        import io

        from vcb_lib.plots import ablation_points

        table = self.plot_data()
        buf = io.BytesIO()
        ablation_points(table).savefig(buf, format="png", dpi=90, bbox_inches="tight")
        self.image.value = buf.getvalue()
        self.table.value = table.drop(columns=["point"]).to_html(index=False, float_format="{:.3f}".format)

    def save(self, path: str | Path | None = None) -> Path:
        """Write the finished points to ``<output_root>/points.csv`` (or ``path``)."""
        from vcb_lib.io import atomic_write_text

        path = Path(path) if path else resolve_path(self.output_root) / "points.csv"
        atomic_write_text(path, self.plot_data().to_csv(index=False))
        self.status.value = f"saved {len(self.results)} point(s) to {path}"
        return path
