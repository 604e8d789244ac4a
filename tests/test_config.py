"""Parameter files: strict keys, types and ranges; overrides; the resolved config."""
from pathlib import Path

import pytest
import yaml

from vcb_lib.config import PROJECT_ROOT, ConfigError, describe, load_params

PARAMS = sorted((PROJECT_ROOT / "params").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.name)
def test_every_params_file_loads(path):
    cfg = load_params(path)
    assert cfg.run.name == path.stem or path.stem in ("smoke", "default")


def test_defaults_and_file_values(tmp_path):
    cfg = load_params(write(tmp_path, "training:\n  gamma: 0.2\nsampling:\n  n: 8\n"))
    assert cfg.training.gamma == 0.2 and cfg.sampling.n == 8
    assert cfg.training.lam == 1.0  # untouched default


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "training:\n  gama: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "unknown key 'training.gama'" in msg
    assert "Did you mean 'training.gamma'?" in msg
    assert str(path) in msg
    assert "training.lam" in msg  # lists the allowed keys of the section


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainig'\. Did you mean 'training'\?"):
        load_params(write(tmp_path, "trainig:\n  gamma: 0.1\n"))


@pytest.mark.parametrize("text, expected", [
    ("training:\n  gamma: fast\n", r"training\.gamma: expected a number, got 'fast'"),
    ("sampling:\n  n: 2.5\n", r"sampling\.n: expected an integer, got 2\.5"),
    ("run:\n  seed: yes\n", r"run\.seed: expected an integer, got True"),
    ("training:\n  bf16: 1\n", r"training\.bf16: expected true/false, got 1"),
    ("sampling:\n  backend: tpu\n", r"sampling\.backend: expected one of 'auto', 'hf', 'vllm', got 'tpu'"),
    ("training:\n  methods: vcb\n", r"training\.methods: expected a list of a string"),
    ("training:\n  methods: [vcb, ppo2]\n", r"unknown method\(s\) \['ppo2'\]; allowed: \['vcb', 'dpo'"),
])
def test_wrong_types_are_named(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_params(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("training:\n  gamma: -0.1\n", r"training\.gamma: must be > 0, got -0\.1"),
    ("training:\n  lam: 0\n", r"training\.lam: must be > 0, got 0"),
    ("sampling:\n  n: 1\n", r"sampling\.n: VCB needs at least 2 candidates per prompt, got 1"),
    ("sampling:\n  top_p: 1.5\n", r"sampling\.top_p: must be in \(0, 1\], got 1\.5"),
    ("training:\n  grad_accum: 0\n", r"training\.grad_accum: must be >= 1, got 0"),
    ("run:\n  name: a/b\n", r"run\.name: 'a/b' must be a folder name"),
])
def test_out_of_range_values(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_params(write(tmp_path, text))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_params(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "training: [\n"))
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_overrides_apply_after_file_and_are_validated(tmp_path):
    path = write(tmp_path, "training:\n  gamma: 0.2\n")
    cfg = load_params(path, ["training.gamma=0.3", "training.methods=[vcb, dpo]", "run.name=x1"])
    assert cfg.training.gamma == 0.3 and cfg.training.methods == ["vcb", "dpo"] and cfg.run.name == "x1"
    assert load_params(path, {"sampling.n": 6}).sampling.n == 6
    with pytest.raises(ConfigError, match=r"Did you mean 'training\.gamma'\?.*in override training\.gama=0\.1"):
        load_params(path, ["training.gama=0.1"])
    with pytest.raises(ConfigError, match=r"training\.gamma: must be > 0.*with overrides training\.gamma=-1"):
        load_params(path, ["training.gamma=-1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_params(path, ["training.gamma"])


def test_hash_changes_with_values_and_sections(tmp_path):
    a = load_params(None)
    b = load_params(None, ["training.gamma=0.5"])
    assert a.hash() != b.hash()
    assert a.hash("sampling", "models") == b.hash("sampling", "models")
    assert a.hash("training") != b.hash("training")
    with pytest.raises(KeyError, match="unknown config section"):
        a.hash("nope")


def test_save_writes_resolved_config(tmp_path):
    cfg = load_params(None, [f"run.output_root={tmp_path}", "run.name=r1", "training.gamma=0.3"])
    path = cfg.save()
    assert path == tmp_path / "r1" / "config.yaml"
    text = path.read_text()
    assert f"hash {cfg.hash()}" in text
    saved = yaml.safe_load(text)
    assert saved["training"]["gamma"] == 0.3
    assert load_params(None, [f"{s}.{k}={v!r}" if isinstance(v, str) else f"{s}.{k}={v}"
                              for s, sec in saved.items() for k, v in sec.items()]).hash() == cfg.hash()


def test_relative_output_root_is_under_project_root():
    assert load_params(None).run_dir == PROJECT_ROOT / "outputs" / "default"


def test_describe_lists_every_key_with_its_doc():
    text = describe(load_params(None))
    assert "gamma: 0.05  # γ, Eq. 9" in text
    assert text.count("#") > 40


def test_scientific_notation_is_a_number(tmp_path):
    cfg = load_params(write(tmp_path, "training:\n  learning_rate: 5e-6\n"), ["theory.tolerance=1e-9"])
    assert cfg.training.learning_rate == 5e-6 and cfg.theory.tolerance == 1e-9
