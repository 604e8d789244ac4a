"""Experiment tracking through accelerate's trackers (``training.log_with``): TensorBoard gets what
log.jsonl gets, under the same names and steps, in ``<run>/tensorboard/<stage>/<training>``; ``none``
writes nothing; a resumed training holds each step once; switching the tracker stales nothing."""
from __future__ import annotations

import copy
import json
import typing

import pytest

from test_trainers import SMOKE, cfg_, candidate_table, make_groups
from vcb_lib.config import ConfigError, TrainingConfig, load_params
from vcb_lib.models import load_policy, load_tokenizer
from vcb_lib.trainers import Trainer, main, tracked_values, tracker_dir, tracker_kwargs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    tok, base = load_tokenizer("tiny-random"), load_policy("tiny-random")
    return tok, base, make_groups(tok, base, 8)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the event files directly in ``folder`` (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def log_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_events_equal_log(events: dict, rows: list[dict]) -> None:
    """Every metric of every log.jsonl row is one scalar event at that row's step (float32 in the file)."""
    names = set().union(*(tracked_values(r) for r in rows))
    assert set(events) == names
    assert {"loss", "lr", "grad_norm", "rewards/chosen", "tokens/s"} <= names  # the log's own names, not renamed
    for tag, points in events.items():
        expected = [(r["step"], r[tag]) for r in rows if tag in r]
        assert [s for s, _ in points] == [s for s, _ in expected], tag
        assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-6), tag


def test_tensorboard_events_are_the_log_jsonl_metrics(tiny, tmp_path):
    tok, base, groups = tiny
    out = tmp_path / "run" / "03_train" / "vcb-gamma0.5-seed0"
    trainer = Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg_(batch_size=2, max_steps=3), out)
    assert TrainingConfig().log_with == "tensorboard"  # the default
    trainer.train()
    folder = tmp_path / "run" / "tensorboard" / "03_train" / "vcb-gamma0.5-seed0"
    assert trainer.log_dir == folder and len(list(folder.glob("events.out.tfevents.*"))) == 1
    rows = log_rows(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_events_equal_log(scalars(folder), rows)
    assert not list(out.rglob("events.out.tfevents.*"))  # nothing inside the artefact folder


def test_mlflow_gets_what_log_jsonl_gets(tiny, tmp_path, monkeypatch):
    """A tracker besides TensorBoard (README: the other accelerate trackers work once installed): mlflow
    (``mlflow-skinny`` + SQLAlchemy, tests/requirements.txt) on a local SQLite store, no server, no network. The run
    is named after the training's folder and holds every log.jsonl metric at its step."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow's import: it would post usage data
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # mlflow 3's default store (its file store cannot hold both
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # "tokens" and "tokens/s": a file and a folder of that name)
    from mlflow.tracking import MlflowClient

    tok, base, groups = tiny
    out = tmp_path / "run" / "03_train" / "vcb-gamma0.5-seed0"
    trainer = Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg_(batch_size=2, max_steps=3, log_with="mlflow"), out)
    trainer.train()
    rows = log_rows(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("vcb-gamma0.5-seed0")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["loss_type"] == "vcb"
    names = set().union(*(tracked_values(r) for r in rows))
    assert set(run.data.metrics) == names and {"loss", "grad_norm", "rewards/chosen"} <= names
    for name in names:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        expected = [(r["step"], r[name]) for r in rows if name in r]
        assert [s for s, _ in history] == [s for s, _ in expected], name
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-9, abs=1e-12), name


def test_log_with_none_writes_no_tracker_files(tiny, tmp_path):
    tok, base, groups = tiny
    trainer = Trainer(copy.deepcopy(base), tok, groups[:4], "dpo", cfg_(batch_size=2, max_steps=1, log_with="none"),
                      tmp_path / "run" / "03_train" / "dpo")
    trainer.train()
    assert trainer.accelerator.log_with == [] and len(log_rows(trainer.log_path)) == 1
    assert not (tmp_path / "run" / "tensorboard").exists() and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_a_resumed_training_holds_each_step_once(tiny, tmp_path):
    """Interrupted after step 3 (checkpoint at step 2): the resumed run's tracker folder has one
    event file with steps 1-4 once each, equal to the log, not the interrupted attempt's steps too."""
    tok, base, groups = tiny
    out = tmp_path / "run" / "03_train" / "vcb"

    def crash_at_3(step, trainer):
        if step == 3:
            raise RuntimeError("killed after step 3 was logged")

    first = Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg_(batch_size=2, max_steps=4, save_every=2), out,
                    on_step=crash_at_3)
    with pytest.raises(RuntimeError, match="killed after step 3"):
        first.train()
    for tracker in first.accelerator.trackers:  # the interrupted process ends: its file is closed
        tracker.finish()
    assert [s for s, _ in scalars(first.log_dir)["loss"]] == [1, 2, 3]
    resumed = Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg_(batch_size=2, max_steps=4, save_every=2), out)
    resumed.train(resume=True)
    rows = log_rows(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert len(list(resumed.log_dir.glob("events.out.tfevents.*"))) == 1
    assert_events_equal_log(scalars(resumed.log_dir), rows)


def test_the_training_command_logs_into_the_runs_tensorboard_folder(tiny, tmp_path):
    """``python -m vcb_lib.trainers`` (what stage 03 launches, in this process here): the method folder
    ``<run>/03_train/<name>`` logs to ``<run>/tensorboard/03_train/<name>``."""
    tok, base, groups = tiny
    table = tmp_path / "candidates.parquet"
    candidate_table(groups[:4]).to_parquet(table)
    out = tmp_path / "smoke" / "03_train" / "vcb-seed0"
    main(["--params", str(SMOKE), "--method", "vcb", "--candidates", str(table), "--out", str(out),
          "--set", "models.sft=false", "--set", "evaluation.curve_points=0", "--set", "training.max_steps=2"])
    assert_events_equal_log(scalars(tmp_path / "smoke" / "tensorboard" / "03_train" / "vcb-seed0"),
                            log_rows(out / "log.jsonl"))


def test_tracker_folders_of_stages_sweep_points_and_panel_points(tmp_path):
    """Every training is its own tracker run: the SFT and reward model of stage 01, each method of
    stage 03, and each sweep or panel point (a run folder of its own inside the base run)."""
    from vcb_lib.stages import artefacts

    run = tmp_path / "default"
    assert tracker_dir(run / "01_models" / "sft" / "training") == run / "tensorboard" / "01_models" / "sft" / "training"
    assert tracker_dir(run / "01_models" / "reward_model" / "training") == \
        run / "tensorboard" / "01_models" / "reward_model" / "training"
    for root in (run / "sweeps" / "gamma", run / "panel"):  # sweep.run_sweep / AblationPanel's output roots
        cfg = load_params(SMOKE, {"run.output_root": str(root), "run.name": "point-1"})
        method = artefacts.method(cfg, "vcb").path
        assert tracker_dir(method) == root / "point-1" / "tensorboard" / "03_train" / method.name
    assert tracker_dir(tmp_path / "scratch") == tmp_path / "scratch" / "tensorboard"  # not in a run: beside its log


def test_log_with_is_validated_and_names_what_is_allowed(monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    allowed = typing.get_args(typing.get_type_hints(TrainingConfig)["log_with"])
    assert set(allowed) == {str(t) for t in LoggerType if str(t) != "all"} | {"none"}  # accelerate's names
    with pytest.raises(ConfigError, match=r"training.log_with: expected one of 'tensorboard', 'none', 'wandb'.*"
                                          r"got 'tensorbord'"):
        load_params(SMOKE, ["training.log_with=tensorbord"])
    installed = accelerate.tracking.get_available_trackers()
    assert {"tensorboard", "mlflow"} <= {str(t) for t in installed}  # the test requirements' trackers
    assert tracker_kwargs("mlflow", "x/y") == {"log_with": ["mlflow"], "project_dir": "x"}
    for missing in ("wandb", "mlflow"):  # a tracker whose package is missing, installed here or not:
        # accelerate would skip it without a word
        monkeypatch.setattr(accelerate.tracking, "get_available_trackers",
                            lambda: [t for t in installed if str(t) != missing])
        with pytest.raises(ValueError, match=rf"'{missing}', but {missing} is not installed.*pip install {missing} "
                                             r"\(or set training.log_with to none\)"):
            tracker_kwargs(missing, "x")
    assert tracker_kwargs("none", "x") == {}


def test_switching_the_tracker_makes_nothing_stale(tmp_path):
    from vcb_lib.stages import artefacts

    a = load_params(SMOKE, {"run.output_root": str(tmp_path)})
    b = load_params(SMOKE, {"run.output_root": str(tmp_path), "training.log_with": "none"})
    assert a.hash() == b.hash() and a.slice("training") == b.slice("training")
    assert "training.log_with" not in a.slice("training", "training.log_with")
    for make in (artefacts.method, artefacts.pool_scores):
        assert make(a, "vcb").key == make(b, "vcb").key
    assert artefacts.eval_metrics(a).key == artefacts.eval_metrics(b).key
