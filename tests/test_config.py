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


# --------------------------------------------------------------------------------------------
# Issue #16: finite numbers, bounds that protect the machine, empty files, papermill's overrides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("training:\n  gamma: .inf\n", r"training\.gamma: must be a finite number, got inf"),
    ("training:\n  gamma: -.inf\n", r"training\.gamma: must be a finite number, got -inf"),
    ("training:\n  lam: .nan\n", r"training\.lam: must be a finite number, got nan"),
    ("sampling:\n  temperature: .NaN\n", r"sampling\.temperature: must be a finite number, got nan"),
    ("theory:\n  figure1_rewards: [0.1, .inf]\n", r"theory\.figure1_rewards\[1\]: must be a finite number, got inf"),
    ("training:\n  max_grad_norm: 1e300\n", r"training\.max_grad_norm: must be a finite number of magnitude <= 1e\+12"),
    ("training:\n  delta: 1" + "0" * 400 + "\n", r"training\.delta: must be a finite number of magnitude <= 1e\+12, "
                                                  r"got an integer of \d+ bits"),  # an int too large for a float
    ("run:\n  seed: 1" + "0" * 30 + "\n", r"run\.seed: must be within ±9223372036854775807 \(int64\)"),
])
def test_numbers_must_be_finite(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_params(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("key", ["training.gamma", "models.sft_learning_rate", "theory.tolerance", "rewards.rm_heldout"])
@pytest.mark.parametrize("override", [float("inf"), float("nan"), ".inf", "-.inf", ".nan"])
def test_every_float_field_rejects_inf_and_nan_in_overrides(key, override):
    """The check is generic (the loader's type check), so it holds for keys without a range check too;
    a dict override (widgets, sweeps) and a --set string (YAML .inf/.nan) both go through it."""
    overrides = {key: override} if isinstance(override, float) else [f"{key}={override}"]
    with pytest.raises(ConfigError, match=rf"{key}: must be a finite number, got (-?inf|nan)"):
        load_params(None, overrides)


@pytest.mark.parametrize("override, expected", [
    ("sampling.n=1025", r"sampling\.n: must be <= 1_024, got 1_025"),
    ("sampling.max_new_tokens=32769", r"sampling\.max_new_tokens: must be <= 32_768, got 32_769"),
    ("sampling.num_prompts=10000001", r"sampling\.num_prompts: must be <= 10_000_000"),
    ("training.learning_rate=5e6", r"training\.learning_rate: must be <= 1\.0, got 5_000_000\.0 \(larger is a typo"),
    ("models.sft_learning_rate=2.0", r"models\.sft_learning_rate: must be <= 1\.0"),
    ("rewards.rm_learning_rate=2.0", r"rewards\.rm_learning_rate: must be <= 1\.0"),
    ("rewards.rm_prompts=10000001", r"rewards\.rm_prompts: must be <= 10_000_000"),
    ("models.max_prompt_tokens=131073", r"models\.max_prompt_tokens: must be <= 131_072"),
    ("evaluation.samples_per_prompt=1025", r"evaluation\.samples_per_prompt: must be <= 1_024"),
    ("evaluation.max_new_tokens=40000", r"evaluation\.max_new_tokens: must be <= 32_768"),
    ("evaluation.bootstrap=1000001", r"evaluation\.bootstrap: must be <= 1_000_000, got 1_000_001"),
    ("evaluation.num_prompts=10000001", r"evaluation\.num_prompts: must be <= 10_000_000"),
    ("evaluation.ood_prompts=10000001", r"evaluation\.ood_prompts: must be <= 10_000_000"),
    ("theory.n_responses=257", r"theory\.n_responses: must be <= 256"),
    ("theory.n_instances=10000", r"theory\.n_instances: n_instances \* n_prompts \* n_responses must be <= 100_000, "
                                 r"got 10000 \* 3 \* 5 = 150_000"),
])
def test_values_that_would_exhaust_the_machine_are_rejected(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_params(None, [override])


@pytest.mark.parametrize("override", [
    "sampling.n=1024", "sampling.max_new_tokens=32768", "training.learning_rate=1.0", "evaluation.samples_per_prompt=1024",
    "evaluation.bootstrap=1000000", "sampling.num_prompts=10000000", "evaluation.num_prompts=10000000",
    "theory.n_responses=256", "theory.n_instances=6666",  # 6666 * 3 * 5 = 99_990
    "training.max_grad_norm=1e12",
])
def test_bounds_are_inclusive(override):
    load_params(None, [override])


@pytest.mark.parametrize("text", ["", "   \n\n", "# only a comment\n  # and another\n", "{}\n", "---\n"])
def test_empty_params_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"is empty: a params file names at least one section") as err:
        load_params(path)
    assert str(path) in str(err.value) and "params/default.yaml" in str(err.value)


def test_one_section_keeps_the_other_defaults(tmp_path):
    assert load_params(write(tmp_path, "run: {}\n")).training.gamma == 0.05
    assert load_params(write(tmp_path, "# comment\nrun: {name: mine}\n")).run.name == "mine"


@pytest.mark.parametrize("value", ["", "  ", "\t"])
def test_output_root_must_not_be_empty(tmp_path, value):
    with pytest.raises(ConfigError, match=r"run\.output_root: must name a folder \(e\.g\. outputs\)"):
        load_params(None, {"run.output_root": value})
    with pytest.raises(ConfigError, match=r"run\.output_root: must name a folder"):
        load_params(write(tmp_path, f"run:\n  output_root: '{value}'\n"))


def test_overrides_given_as_one_yaml_string_as_papermill_passes_them():
    """papermill -p overrides '["k=v"]' injects one string; iterating it would give its characters."""
    cfg = load_params(None, '["training.gamma=0.3", "run.name=pm"]')
    assert cfg.training.gamma == 0.3 and cfg.run.name == "pm"
    assert load_params(None, "[]").training.gamma == 0.05
    assert load_params(None, "- sampling.n=6\n").sampling.n == 6  # block style is a YAML list too


@pytest.mark.parametrize("text", ["training.gamma=0.3", "", "[1, 2]", "{training.gamma: 0.3}", "[training.gamma=0.3"])
def test_overrides_string_that_is_not_a_list_of_strings_is_an_error(text):
    with pytest.raises(ConfigError, match=r"overrides given as a string must be a YAML list of 'section\.key=value' "
                                          r"strings, e\.g\. '\[\"training\.gamma=0\.1\"\]'"):
        load_params(None, text)
