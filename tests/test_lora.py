"""LoRA adapters (training.lora, peft) through the one Trainer: adapters off is π_sft exactly, the
merged final/ is the adapted policy, 1 process equals 2, resume equals the uninterrupted run,
checkpoints hold only the adapters, and target modules the model lacks fail naming the ones it has.
Tiny random Llama, CPU, fp32."""
from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vcb_lib.config import PROJECT_ROOT, ConfigError, LoraConfig, TrainingConfig, load_params
from vcb_lib.data import candidate_groups
from vcb_lib.launch import launch_subprocess
from vcb_lib.logps import sequence_logps
from vcb_lib.models import load_policy
from vcb_lib.stages.artefacts import method_dir_name, method_key
from test_trainers import kill_at, make_groups
from vcb_lib.trainers import ADAPTER_DIR, ADAPTER_FILE, MODEL_FILE, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"
LR_EQ = 5e-5  # as tests/test_trainers.py: Adam sign flips of near-cancelling gradients stay below 1e-6
ENTRY_OVERRIDES = ["training.max_steps=0", "training.warmup_steps=0", f"training.learning_rate={LR_EQ}", "training.gamma=0.5",
                   "models.sft=false", "training.lora.enabled=true", "training.lora.methods=[vcb]",
                   "training.lora.target_modules=[q_proj, v_proj, down_proj]"]


@pytest.fixture(scope="module")
def groups(tok, base):
    return make_groups(tok, base, 12)


def cfg_(**kw) -> TrainingConfig:
    return TrainingConfig(**{"learning_rate": 1e-3, "warmup_steps": 0, "gamma": 0.5, **kw})


def lora_(**kw) -> LoraConfig:
    return LoraConfig(**{"enabled": True, "r": 4, "alpha": 8, **kw})


def scored(groups) -> tuple[list[str], list[list[int]]]:
    """Every (prompt, response) of ``groups``, flat: what the log-prob comparisons score."""
    return [g.prompt for g in groups for _ in g.response_ids], [r for g in groups for r in g.response_ids]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_adapters_off_is_sft_and_the_merged_final_is_the_adapted_policy(tok, base, groups, tmp_path):
    """After 3 DPO steps on every linear layer's adapters: with the adapters disabled the model is π_sft
    exactly (every base weight bit for bit, and the same log-probs bit for bit); the adapted model moved
    away from them; only the adapters have AdamW states; final/ (merged) and final/adapter/ over π_sft
    both score what the adapted model scored.

    π_sft is scored frozen, as its weights are under the adapters: with the shared-prompt batch, torch's
    matmul picks its kernel for the (tied) LM head by whether the weight requires grad, even under
    no_grad, which moves a log-prob by ~1e-5 nats (the same weights; checked below)."""
    prompts, responses = scored(groups[:4])
    frozen = copy.deepcopy(base).requires_grad_(False)
    sft = sequence_logps(frozen, tok, prompts, responses)
    assert torch.allclose(sequence_logps(base, tok, prompts, responses), sft, rtol=0, atol=1e-4)
    seen = {}

    def on_step(step: int, trainer: Trainer) -> None:
        if step != trainer.total_steps:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        seen["adapted"] = sequence_logps(model, tok, prompts, responses)
        with model.disable_adapter():
            seen["off"] = sequence_logps(model, tok, prompts, responses)
        seen["base"] = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.get_base_model().named_parameters()
                        if "lora_" not in n}
        trained = [p for p in model.parameters() if p.requires_grad]
        seen["trained"] = sum(p.numel() for p in trained)
        seen["state"] = sum(t.numel() for s in trainer.optimizer.state.values() for t in s.values() if t.dim())
        seen["total"] = sum(p.numel() for p in model.parameters())

    lora = lora_(target_modules=["all-linear"])
    trainer = Trainer(copy.deepcopy(base), tok, groups, "dpo", cfg_(batch_size=4, max_steps=3, learning_rate=1e-2),
                      tmp_path / "out", on_step=on_step, lora=lora)
    trainer.train()
    weights = dict(base.named_parameters())
    assert seen["base"].keys() == weights.keys() and all(torch.equal(seen["base"][k], weights[k]) for k in weights)
    assert torch.equal(seen["off"], sft)
    assert (seen["adapted"] - sft).abs().max() > 1e-2  # ... and the adapters did
    assert seen["state"] == 2 * seen["trained"] and seen["trained"] < seen["total"] / 10  # exp_avg + exp_avg_sq

    final = tmp_path / "out" / "final"
    assert (final / MODEL_FILE).is_file() and not (final / "adapter_config.json").exists()  # a plain model folder
    merged = sequence_logps(load_policy(final), tok, prompts, responses)
    assert torch.allclose(merged, seen["adapted"], atol=1e-4), (merged - seen["adapted"]).abs().max()
    from peft import PeftModel

    over_sft = PeftModel.from_pretrained(copy.deepcopy(base), final / ADAPTER_DIR)
    assert torch.allclose(sequence_logps(over_sft, tok, prompts, responses), seen["adapted"], atol=1e-6)
    config = json.loads((final / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert json.loads((tmp_path / "out" / "training_config.json").read_text())["lora"]["r"] == 4


def candidate_table(groups) -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": g.prompt_id, "prompt": g.prompt, "model_input": g.prompt, "k": k, "response_ids": ids,
                          "reward": r, "ref_logp": q} for g in groups
                         for k, (ids, r, q) in enumerate(zip(g.response_ids, g.rewards, g.ref_logps))])


def test_two_processes_equal_one(tok, base, groups, tmp_path):
    """A real 2-process gloo run with adapters (batch 2 per process, ``accelerate launch -m
    vcb_lib.trainers``, training.lora from the command line) equals one in-process run with batch 4:
    the same losses, adapters and merged final/."""
    table = tmp_path / "candidates.parquet"
    candidate_table(groups[:10]).to_parquet(table)
    overrides = ENTRY_OVERRIDES + ["training.batch_size=2"]
    launch_subprocess(["-m", "vcb_lib.trainers", "--params", str(SMOKE), "--method", "vcb", "--candidates", str(table),
                       "--out", str(tmp_path / "two"), *sum((["--set", o] for o in overrides), [])],
                      num_processes=2, cpu=True, echo=lambda line: None)
    cfg = load_params(SMOKE, ENTRY_OVERRIDES + ["training.batch_size=4"])
    one = Trainer(copy.deepcopy(base), tok, candidate_groups(candidate_table(groups[:10])), "vcb", cfg.training,
                  tmp_path / "one", seed=cfg.run.seed, lora=cfg.training.lora_for("vcb"))
    one.train()

    def log(name):
        return [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    assert [r["prompts"] for r in log("two")] == [4, 4, 2]
    for a, b in zip(log("two"), log("one")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    adapters = {name: load_file(tmp_path / name / "final" / ADAPTER_DIR / "adapter_model.safetensors") for name in ("two", "one")}
    assert max_diff(adapters["two"], adapters["one"]) < 3e-6  # fp32 rounding (batch shapes differ)
    assert max(t.abs().max().item() for k, t in adapters["one"].items() if "lora_B" in k) > 100 * 1e-6  # B moved from 0
    merged = {name: load_file(tmp_path / name / "final" / MODEL_FILE) for name in ("two", "one")}
    assert max_diff(merged["two"], merged["one"]) < 3e-6


def test_resume_equals_uninterrupted_run(tok, base, groups, tmp_path, monkeypatch):
    """Killed in step 5 (of 6, checkpoints every 2), with adapter dropout on (the RNG state must be
    restored) and a cosine schedule: resuming from step 4 gives the uninterrupted adapters and final/.
    A checkpoint holds the adapters alone; a resume with another adapter config is refused."""
    cfg = cfg_(batch_size=2, grad_accum=2, epochs=2, save_every=2, lr_schedule="cosine", warmup_steps=2)
    lora = lora_(dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg, tmp_path / "full", lora=lora).train()

    out = tmp_path / "cut"
    kill_at(monkeypatch, 5)
    first = Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg, out, lora=lora)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    monkeypatch.undo()
    ckpt = out / "checkpoints" / "step-000004"
    assert not (ckpt / MODEL_FILE).exists()
    saved = load_file(ckpt / ADAPTER_FILE)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert sum(t.numel() for t in saved.values()) < sum(p.numel() for p in base.parameters()) / 10
    assert json.loads((ckpt / "trainer_state.json").read_text())["lora"]["r"] == 4

    with pytest.raises(ValueError, match="cannot resume exactly.*'r': 8"):
        Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg, out, lora=lora_(r=8, dropout=0.1)).train(resume=True)
    torch.manual_seed(12345)  # a different RNG state: resume must restore the saved one
    resumed = Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg, out, lora=lora)
    resumed.train(resume=True)
    assert [json.loads(x)["step"] for x in resumed.log_path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    for name in (f"{ADAPTER_DIR}/adapter_model.safetensors", MODEL_FILE):
        full, cut = load_file(tmp_path / "full" / "final" / name), load_file(out / "final" / name)
        assert max_diff(cut, full) <= 1e-6, name
    moved = load_file(tmp_path / "full" / "final" / f"{ADAPTER_DIR}/adapter_model.safetensors")
    assert max(t.abs().max().item() for k, t in moved.items() if "lora_B" in k) > 1e-3


def test_target_modules_the_model_lacks_fail_naming_its_layers(tok, base, groups, tmp_path):
    """Before anything trains or is written: the unknown names, then the layers adapters can wrap."""
    layers = "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    for targets, bad in ((["q_proj", "qkv_proj"], "['qkv_proj']"), (["mlp"], "['mlp']"), (["query_key_value"], "['query_key_value']")):
        expected = re.escape(f"target_modules: {bad} name no layer of this LlamaForCausalLM") + ".*" + re.escape(layers)
        with pytest.raises(ValueError, match=expected):
            Trainer(copy.deepcopy(base), tok, groups, "vcb", cfg_(), tmp_path / "out", lora=lora_(target_modules=targets))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="all-linear stands alone"):
        load_params(None, ["training.lora.target_modules=[all-linear, q_proj]"])


def test_lora_config_is_checked_and_keys_only_the_adapted_methods():
    """training.lora: on-policy methods refused, unknown keys named; the artefact key and folder name
    of a method change only when adapters train it (full fine-tuning keeps its key)."""
    with pytest.raises(ConfigError, match=r"training.lora.methods: \['ppo'\] cannot train adapters"):
        load_params(SMOKE, ["training.lora.methods=[ppo]"])
    with pytest.raises(ConfigError, match="on-policy methods .*'ppo'.* train every weight"):
        load_params(SMOKE, ["training.lora.methods=[]"])  # smoke.yaml trains the on-policy methods too
    with pytest.raises(ConfigError, match="Did you mean 'training.lora.r'"):
        load_params(None, ["training.lora.rank=4"])
    with pytest.raises(ConfigError, match="training.lora.r: must be in 1..4096"):
        load_params(None, ["training.lora.r=0"])

    off = load_params(SMOKE, ["training.lora.enabled=false"])
    on = load_params(SMOKE, [])  # smoke.yaml: DPO with adapters
    assert on.training.lora_for("dpo") is not None and on.training.lora_for("vcb") is None
    assert method_key(off, "vcb") == method_key(on, "vcb") and method_dir_name(off, "vcb") == method_dir_name(on, "vcb")
    assert not any(k.startswith("training.lora") for k in method_key(off, "dpo"))
    assert method_key(on, "dpo")["training.lora.r"] == 8 and method_dir_name(on, "dpo").endswith("-lora-r8-seed0")
    alpha = load_params(SMOKE, ["training.lora.alpha=32"])
    assert method_key(alpha, "dpo") != method_key(on, "dpo") and method_key(alpha, "vcb") == method_key(on, "vcb")
