"""The one Trainer: every loss moves the parameters, accumulation and process count do not change
the result, resume is exact, divergence stops before anything is stepped or saved, logs and
schedules are right. Tiny random models, CPU, fp32."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vcb_lib.config import PROJECT_ROOT, TrainingConfig, load_params
from vcb_lib.data import CandidateGroup, candidate_groups
from vcb_lib.launch import launch_subprocess
from vcb_lib.losses import LossType
from vcb_lib.logps import sequence_logps
from vcb_lib.models import load_policy, tiny_random_config
from vcb_lib.trainers import (
    CheckpointWarning,
    Trainer,
    TrainingDiverged,
    lr_lambda,
    order_groups,
    policy_scores,
    reward_scores,
    split_even,
)

WORDS = ["cat", "dog", "sun", "sky", "tree", "river", "stone", "cloud"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_groups(tok, model, n_prompts: int, n: int = 3, seed: int = 0, vocab=(3, 5000)) -> list[CandidateGroup]:
    """Random prompts/responses, Gaussian rewards, reference log-probs from ``model``."""
    rng = random.Random(seed)
    prompts = [f"prompt {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for i in range(n_prompts)]
    resp = [[[rng.randrange(*vocab) for _ in range(rng.randint(3, 10))] for _ in range(n)] for _ in prompts]
    ref = sequence_logps(model, tok, [p for p, rs in zip(prompts, resp) for _ in rs], [r for rs in resp for r in rs])
    ref = ref.view(n_prompts, n).tolist()
    return [CandidateGroup(f"p{i}", prompts[i], resp[i], [rng.gauss(0, 1) for _ in range(n)], ref[i])
            for i in range(n_prompts)]


def kill_at(monkeypatch, step: int) -> None:
    """Make every Trainer raise KeyboardInterrupt at optimizer step ``step`` (a kill stand-in;
    ``monkeypatch.undo()`` lifts it)."""
    step_fn = Trainer._optimizer_step

    def killed(self, s, chunk):
        if s == step:
            raise KeyboardInterrupt
        return step_fn(self, s, chunk)

    monkeypatch.setattr(Trainer, "_optimizer_step", killed)


@pytest.fixture(scope="module")
def groups(tok, base):
    return make_groups(tok, base, 12)


def cfg_(**kw) -> TrainingConfig:
    return TrainingConfig(**{"learning_rate": 1e-3, "warmup_steps": 0, "gamma": 0.5, **kw})


def params(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_log(trainer) -> list[dict]:
    return [json.loads(line) for line in trainer.log_path.read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


def tiny_reward_model():
    from transformers import LlamaForSequenceClassification

    config = tiny_random_config()
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return LlamaForSequenceClassification(config)


def judged_groups(groups: list[CandidateGroup]) -> list[CandidateGroup]:
    """``groups`` with a judgment per candidate (CUT): every second candidate negative, its judgment
    context the prompt with a critique appended."""
    return [dataclasses.replace(g, judged_prompts=[f"{g.prompt} Judgment: too dull, answer {k}." for k in range(len(g.response_ids))],
                                negative=[k % 2 == 0 for k in range(len(g.response_ids))]) for g in groups]


def preference_groups(n_prompts: int, seed: int = 0) -> list[CandidateGroup]:
    """(chosen, rejected) pairs, labels [1, 0]: chosen responses use low token ids, rejected high."""
    rng = random.Random(seed)
    return [CandidateGroup(f"rm{i}", f"question {i}: " + rng.choice(WORDS),
                           [[rng.randrange(100, 200) for _ in range(rng.randint(3, 6))],
                            [rng.randrange(3000, 3100) for _ in range(rng.randint(3, 6))]],
                           [1.0, 0.0], [0.0, 0.0]) for i in range(n_prompts)]


# --------------------------------------------------------------------------------------------
# every loss trains
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lt", list(LossType))
def test_one_step_changes_every_parameter(lt, tok, base, groups, tmp_path):
    if lt is LossType.BT:
        model, data, score_fn = tiny_reward_model(), preference_groups(4), reward_scores
    elif lt.judged:  # CUT: each candidate with a judgment, negative ones also scored in its context
        model, data, score_fn = copy.deepcopy(base), judged_groups(groups[:4]), policy_scores
    else:
        model, data, score_fn = copy.deepcopy(base), groups[:4], policy_scores
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, tok, data, lt, cfg_(batch_size=2, grad_accum=2, max_steps=1), tmp_path, score_fn=score_fn)
    summary = trainer.train()
    after = params(trainer)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{lt}: parameters not updated by one step: {unchanged}"
    row = read_log(trainer)[0]
    assert row["step"] == 1 and math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert summary["steps"] == 1 and (tmp_path / "final" / "config.json").is_file()


def test_sft_model_trains_on_targets(tok, base, tmp_path):
    """The SFT stage is the same trainer: one target per prompt, LossType.SFT (NLL)."""
    data = [CandidateGroup(g.prompt_id, g.prompt, g.response_ids[:1], [0.0], [0.0]) for g in make_groups(tok, base, 4)]
    trainer = Trainer(copy.deepcopy(base), tok, data, "sft", cfg_(batch_size=4, epochs=6, learning_rate=1e-2), tmp_path)
    trainer.train()
    losses = [r["loss"] for r in read_log(trainer)]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert "sft/nll" in read_log(trainer)[0]


def test_reward_model_learns_preferences(tok, tmp_path):
    trainer = Trainer(tiny_reward_model(), tok, preference_groups(8), LossType.BT,
                      cfg_(batch_size=4, epochs=5, learning_rate=3e-3), tmp_path, score_fn=reward_scores)
    trainer.train()
    rows = read_log(trainer)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/accuracies"] == 1.0
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_reward_scores_read_the_last_real_token(tok):
    """The score sits at each row's last attended token, even when that token equals the pad id
    (SmolLM2: pad == eos), where HF's own pooling would read one token too early."""
    from vcb_lib.logps import tokenize_pairs

    rm = tiny_reward_model().eval()
    eos = tok.eos_token_id
    batch = tokenize_pairs(tok, ["a b", "c d e f"], [[100, 101, eos], [200, 201, 202, 203, 204]])  # (2, T)
    with torch.no_grad():
        got = reward_scores(rm, batch)
        hidden = rm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].sum(-1) - 1
        want = rm.score(hidden)[torch.arange(2), last, 0]
        hf = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(got, want)
    assert not torch.isclose(hf[0], want[0])  # row 0 ends with eos == pad: HF pools the wrong token


def test_gradient_checkpointing_changes_nothing_and_bf16_trains(tok, base, groups, tmp_path):
    cfg = dict(batch_size=2, grad_accum=2, max_steps=2, learning_rate=LR_EQ)
    plain = Trainer(copy.deepcopy(base), tok, groups[:8], "ipo", cfg_(**cfg), tmp_path / "plain")
    plain.train()
    ckpt = Trainer(copy.deepcopy(base), tok, groups[:8], "ipo", cfg_(**cfg, gradient_checkpointing=True), tmp_path / "gc")
    assert ckpt.share_prompts and plain.share_prompts  # prompts run once per group with checkpointing too
    ckpt.train()
    assert max_diff(params(plain), params(ckpt)) < 1e-6
    assert read_log(ckpt)[0]["loss"] == pytest.approx(read_log(plain)[0]["loss"], rel=1e-6)
    bf16 = Trainer(copy.deepcopy(base), tok, groups[:8], "ipo", cfg_(**cfg | {"max_steps": 1}, bf16=True), tmp_path / "bf16")
    bf16.train()
    rows = read_log(bf16)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(read_log(plain)[0]["loss"], rel=0.05)  # bf16 autocast, fp32 weights
    assert all(v.dtype == torch.float32 for v in params(bf16).values())
    assert max_diff(params(bf16), base.state_dict()) > 1e-5
    saved = json.loads((tmp_path / "bf16" / "training_config.json").read_text())
    assert saved["bf16"] is True and saved["loss_type"] == "ipo" and saved["step_size"] == 4


# --------------------------------------------------------------------------------------------
# invariances: accumulation, processes
# --------------------------------------------------------------------------------------------

# Adam divides by sqrt(v): an element whose gradient nearly cancels can flip sign under float
# rounding and move by ~lr. A small lr keeps those isolated elements below the 1e-6 tolerance while
# every parameter still moves ~100x more; loss and grad_norm catch errors of gradient scale.
LR_EQ = 5e-5


def test_batch_times_accumulation_invariance(tok, base, groups, tmp_path):
    """batch 4 x accumulation 1 == 1 x 4 == 2 x 2, including the short last step (10 prompts:
    steps of 4, 4, 2 -> the 1 x 4 run pads the last step with two weight-0 micro-batches)."""
    runs = {}
    for bs, ga in ((4, 1), (1, 4), (2, 2)):
        t = Trainer(copy.deepcopy(base), tok, groups[:10], "vcb", cfg_(batch_size=bs, grad_accum=ga, learning_rate=LR_EQ,
                    lr_schedule="cosine", warmup_steps=1), tmp_path / f"{bs}x{ga}")
        t.train()
        runs[bs, ga] = params(t), read_log(t)
    ref_params, ref_log = runs[4, 1]
    moved = max_diff(ref_params, base.state_dict())
    assert moved > 100 * 1e-6
    assert [r["prompts"] for r in ref_log] == [4, 4, 2]
    for key in ((1, 4), (2, 2)):
        p, rows = runs[key]
        assert max_diff(p, ref_params) < 3e-6, key  # fp32 rounding (batch shapes differ); moved > 1e-4
        for a, b in zip(rows, ref_log):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert a["lr"] == b["lr"] and a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)  # logp rounding


SMOKE = PROJECT_ROOT / "params" / "smoke.yaml"
ENTRY_OVERRIDES = ["training.max_steps=0", "training.warmup_steps=0", f"training.learning_rate={LR_EQ}", "training.gamma=0.5",
                   "models.sft=false"]  # train tiny-random itself, not a stage-01 SFT model


def candidate_table(groups) -> pd.DataFrame:
    """``groups`` as stage 02 writes them: one row per candidate."""
    return pd.DataFrame([{"prompt_id": g.prompt_id, "prompt": g.prompt, "model_input": g.prompt, "k": k, "response_ids": ids,
                          "reward": r, "ref_logp": q} for g in groups
                         for k, (ids, r, q) in enumerate(zip(g.response_ids, g.rewards, g.ref_logps))])


def launch_entry(groups, out, overrides: list[str], **launch) -> list[str]:
    """Write ``groups`` as a candidate table and train VCB on it through ``accelerate launch -m
    vcb_lib.trainers`` (smoke params + ``ENTRY_OVERRIDES`` + ``overrides``); the streamed lines."""
    table = out.parent / f"{out.name}-candidates.parquet"
    candidate_table(groups).to_parquet(table)
    lines = []
    launch_subprocess(["-m", "vcb_lib.trainers", "--params", str(SMOKE), "--method", "vcb", "--candidates", str(table),
                       "--out", str(out), *sum((["--set", o] for o in ENTRY_OVERRIDES + overrides), [])],
                      echo=lines.append, **launch)
    return lines


def in_process_run(tok, base, groups, out, overrides: list[str]) -> Trainer:
    """The same run as ``launch_entry`` in this process (on the CPU: see conftest)."""
    cfg = load_params(SMOKE, ENTRY_OVERRIDES + overrides)
    trainer = Trainer(copy.deepcopy(base), tok, candidate_groups(candidate_table(groups)), "vcb", cfg.training, out,
                      seed=cfg.run.seed)
    trainer.train()
    return trainer


def test_two_processes_equal_one(tok, base, groups, tmp_path):
    """A real 2-process gloo run (batch 2 per process) through the subprocess launcher and the
    module entry point equals one in-process run with batch 4."""
    lines = launch_entry(groups[:10], tmp_path / "two", ["training.batch_size=2"], num_processes=2, cpu=True)
    two_log = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    one = in_process_run(tok, base, groups[:10], tmp_path / "one", ["training.batch_size=4"])
    assert [r["prompts"] for r in two_log] == [4, 4, 2]
    for a, b in zip(two_log, read_log(one)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert max_diff(two, params(one)) < 3e-6  # fp32 rounding (batch shapes differ)
    assert max_diff(two, base.state_dict()) > 100 * 1e-6
    assert any('"steps": 3' in line for line in lines)  # the summary line streamed back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_entry_point_trains_on_a_gpu_like_on_the_cpu(tok, base, groups, tmp_path):
    """``accelerate launch -m vcb_lib.trainers`` on one GPU (shared prompts, fp32) logs the CPU
    run's losses and gradient norms; with bf16 autocast it trains with finite losses near them."""
    cpu = read_log(in_process_run(tok, base, groups[:8], tmp_path / "cpu", ["training.batch_size=4"]))
    for name, extra in (("fp32", []), ("bf16", ["training.bf16=true"])):
        lines = launch_entry(groups[:8], tmp_path / name, ["training.batch_size=4", "run.device=cuda", *extra])
        log = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert len(log) == len(cpu) == 2 and all(math.isfinite(r["loss"]) for r in log), lines[-20:]
        config = json.loads((tmp_path / name / "training_config.json").read_text())
        assert config["share_prompts"] is True
        rel = 1e-4 if name == "fp32" else 0.05  # fp32 on both (no TF32): summation order only
        for a, b in zip(log, cpu):
            assert a["loss"] == pytest.approx(b["loss"], rel=rel) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel)
        moved = max_diff(load_file(tmp_path / name / "final" / "model.safetensors"), base.state_dict())
        assert moved > 100 * 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_with_checkpointing_trains_on_a_gpu(tok, base, groups, tmp_path):
    """The paper files' way (params/accelerate/fsdp.yaml: FULL_SHARD, bf16; gradient checkpointing),
    here in one process: losses near the CPU fp32 run's, one gathered final/ with every tensor."""
    cpu = read_log(in_process_run(tok, base, groups[:8], tmp_path / "cpu", ["training.batch_size=4"]))
    lines = launch_entry(groups[:8], tmp_path / "fsdp", ["training.batch_size=4", "run.device=cuda",
                         "training.gradient_checkpointing=true", "training.bf16=true"],
                         config_file=PROJECT_ROOT / "params" / "accelerate" / "fsdp.yaml")
    log = [json.loads(x) for x in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert len(log) == len(cpu) == 2, lines[-20:]
    assert json.loads((tmp_path / "fsdp" / "training_config.json").read_text())["share_prompts"] is False  # untested there
    for a, b in zip(log, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.05)
    final = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert set(final) <= set(base.state_dict()) and max_diff(final, base.state_dict()) > 100 * 1e-6


# --------------------------------------------------------------------------------------------
# checkpoints, resume, divergence
# --------------------------------------------------------------------------------------------


def test_resume_equals_uninterrupted_run(tok, base, groups, tmp_path, monkeypatch):
    """Killed in step 5 (of 6, checkpoints every 2): resuming from step 4, in the middle of an
    epoch, with dropout on and a cosine schedule, gives the uninterrupted parameters."""
    def model():
        m = copy.deepcopy(base)
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.1  # the RNG state must be restored too
        return m

    cfg = cfg_(batch_size=2, grad_accum=2, epochs=2, save_every=2, lr_schedule="cosine", warmup_steps=2)
    full = Trainer(model(), tok, groups, "vcb", cfg, tmp_path / "full")
    full.train()

    out = tmp_path / "cut"
    first = Trainer(model(), tok, groups, "vcb", cfg, out)
    kill_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    monkeypatch.undo()
    assert [p.name for p in first.checkpoints()] == ["step-000002", "step-000004"]
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["position"]) == (1, 1, 4)

    (out / "checkpoints" / ".tmp-step-000006").mkdir()  # a save killed half-way ...
    (out / "checkpoints" / "step-000008").mkdir()  # ... and a folder without trainer_state.json
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(model(), tok, groups, "vcb", cfg, out).train()
    with pytest.warns(CheckpointWarning, match="step-000008 is damaged: no checksums.json"):  # skipped, moved aside
        with pytest.raises(ValueError, match="cannot resume exactly"):
            Trainer(model(), tok, groups, "vcb", cfg_(batch_size=3, epochs=2), out).train(resume=True)

    torch.manual_seed(12345)  # a different RNG state: resume must restore the saved one
    resumed = Trainer(model(), tok, groups, "vcb", cfg, out)
    resumed.train(resume=True)
    diff = max_diff(params(resumed), params(full))
    assert diff <= 1e-6, diff
    assert max_diff(params(full), base.state_dict()) > 1e-3
    steps = [r["step"] for r in read_log(resumed)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in resumed.checkpoints()] == ["step-000004", "step-000006"]


def test_nan_loss_stops_before_step_and_save(tok, base, groups, tmp_path):
    """A NaN score for one prompt in step 3, micro-batch 1 raises TrainingDiverged naming them;
    the step-2 checkpoint stays the latest and the model was not stepped with the NaN batch."""
    calls = {"n": 0}

    def nan_in_call_6(model, batch):
        scores = policy_scores(model, batch)  # (R,)
        calls["n"] += 1
        if calls["n"] == 6:  # step 3 = calls 5, 6 (grad_accum 2)
            first = int(batch["mask"][0].sum())
            scores = torch.cat([torch.full((first,), float("nan")), scores[first:]])
        return scores

    data = groups[:8]
    trainer = Trainer(copy.deepcopy(base), tok, data, "dpo", cfg_(batch_size=2, grad_accum=2, epochs=2, save_every=1),
                      tmp_path, score_fn=nan_in_call_6)
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    order = order_groups(trainer.lengths, 4, 0, epoch=1)  # step 3 = the first step of epoch 1
    micro = split_even(order[:4], 2)[1]
    ids = [data[j].prompt_id for j in micro]
    message = str(err.value)
    assert "step 3, micro-batch 1" in message and repr([ids[0]]) in message and repr(ids) in message
    assert (err.value.step, err.value.micro_batch, err.value.prompt_ids) == (3, 1, [ids[0]])
    assert [p.name for p in trainer.checkpoints()] == ["step-000001", "step-000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    saved = load_file(tmp_path / "checkpoints" / "step-000002" / "model.safetensors")
    assert max_diff(saved, params(trainer)) == 0.0  # no optimizer step after step 2
    assert [r["step"] for r in read_log(trainer)] == [1, 2]


def test_nan_gradient_stops_before_optimizer_step(tok, base, groups, tmp_path):
    """Finite loss, NaN gradient (d sqrt(x)/dx at 0 times 0): caught at the gradient norm."""
    def nan_grad(model, batch):
        scores = policy_scores(model, batch)
        return scores + torch.sqrt(scores * 0.0)

    model = copy.deepcopy(base)
    trainer = Trainer(model, tok, groups[:4], "vcb", cfg_(batch_size=2, grad_accum=2), tmp_path, score_fn=nan_grad)
    with pytest.raises(TrainingDiverged, match="step 1: gradient norm is nan") as err:
        trainer.train()
    assert err.value.micro_batch is None and sorted(err.value.prompt_ids) == [g.prompt_id for g in groups[:4]]
    assert max_diff(params(trainer), base.state_dict()) == 0.0 and trainer.latest_checkpoint() is None


# --------------------------------------------------------------------------------------------
# logs, schedule, data order
# --------------------------------------------------------------------------------------------


def test_log_keys_and_warmup(tok, base, groups, tmp_path):
    trainer = Trainer(copy.deepcopy(base), tok, groups[:8], "vcb",
                      cfg_(batch_size=2, warmup_steps=4, max_steps=3, learning_rate=1e-3), tmp_path)
    summary = trainer.train()
    rows = read_log(trainer)
    assert [r["lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])  # step s: lr * s / warmup
    keys = {"step", "epoch", "loss", "lr", "grad_norm", "tokens/s", "elapsed", "prompts", "tokens",
            "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "vcb/sigma_r"}
    assert keys <= rows[0].keys()
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["epoch"] == pytest.approx(0.25)
    assert all(r["tokens/s"] > 0 and r["tokens"] > 0 for r in rows)
    assert rows[-1]["elapsed"] > rows[0]["elapsed"] > 0
    assert summary["tokens/s"] > 0 and summary["steps"] == 3


def test_lr_schedule_values():
    const = [lr_lambda(i, warmup=3, total=10, schedule="constant") for i in range(10)]
    assert const == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1, 1])
    cos = [lr_lambda(i, warmup=2, total=10, schedule="cosine") for i in range(10)]
    assert cos[:2] == pytest.approx([0.5, 1.0])
    assert cos[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 9)))
    assert all(a > b for a, b in zip(cos[1:], cos[2:])) and cos[-1] > 0
    assert lr_lambda(0, warmup=0, total=5, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    with pytest.raises(ValueError, match="allowed"):
        lr_lambda(5, warmup=0, total=5, schedule="linear")


def test_order_groups_buckets_by_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(230)]
    order = order_groups(lengths, step_size=2, seed=3, epoch=0, mega_steps=10)
    assert sorted(order) == list(range(230))
    assert order == order_groups(lengths, 2, 3, 0, mega_steps=10)  # deterministic
    assert order != order_groups(lengths, 2, 3, 1, mega_steps=10)  # reshuffled every epoch
    megas = [order[i:i + 20] for i in range(0, 230, 20)]
    ordered = [[lengths[j] for j in m] == sorted((lengths[j] for j in m), reverse=True) for m in megas]
    assert sum(ordered) >= len(megas) - 2  # longest first in each, but for the swap of the longest step
    assert lengths[order[0]] == max(lengths)  # the longest step comes first
    pad = lambda o: sum(max(lengths[j] for j in o[i:i + 2]) * 2 - sum(lengths[j] for j in o[i:i + 2]) for i in range(0, 230, 2))
    shuffled = list(range(230))
    random.Random(1).shuffle(shuffled)
    assert pad(order) < 0.2 * pad(shuffled)  # bucketing cuts padding


def test_split_even():
    assert split_even(list(range(8)), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_even([0, 1, 2], 4) == [[0], [1], [2], []]
    assert [len(s) for s in split_even(list(range(10)), 4)] == [3, 3, 2, 2]


# --------------------------------------------------------------------------------------------
# stage 01: SFT through the same trainer
# --------------------------------------------------------------------------------------------


def test_train_sft_stage(base, tmp_path):
    from vcb_lib.manifest import ArtefactError
    from vcb_lib.stages.artefacts import sft_spec
    from vcb_lib.stages.sft_and_reward import train_sft

    smoke = PROJECT_ROOT / "params" / "smoke.yaml"
    over = {"run.output_root": str(tmp_path), "models.sft": True, "models.sft_learning_rate": 1e-3, "training.batch_size": 2}
    cfg = load_params(smoke, over)
    pairs = pd.DataFrame({"prompt_id": [f"q{i}" for i in range(6)], "prompt": [f"Say something about {w}." for w in WORDS[:6]],
                          "chosen": [f"The {w} is lovely." for w in WORDS[:6]], "rejected": ["no"] * 6,
                          "split": ["train"] * 5 + ["heldout"]})
    with pytest.raises(ArtefactError, match="not built yet.*run stage 01_sft_and_reward"):
        sft_spec(cfg)
    messages = []
    folder = train_sft(cfg, pairs, log=messages.append)
    assert sft_spec(cfg) == str(folder) and (folder / "config.json").is_file()
    rows = [json.loads(x) for x in (folder / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["prompts"] for r in rows] == [2, 2, 1] and rows[0]["lr"] == pytest.approx(1e-3 / 10)  # 5 targets, batch 2
    sft = load_policy(str(folder))
    assert max_diff(sft.state_dict(), base.state_dict()) > 1e-4
    assert train_sft(cfg, pairs, log=messages.append) == folder and "up to date" in messages[-1]
    off = load_params(smoke, {**over, "models.sft": False})
    assert train_sft(off, pairs, log=messages.append) is None and sft_spec(off) == "tiny-random"


def test_curve_steps():
    from vcb_lib.trainers import curve_steps

    assert curve_steps(8, 1) == [4] and curve_steps(9, 2) == [3, 6] and curve_steps(100, 4) == [20, 40, 60, 80]
    assert curve_steps(8, 0) == [] and curve_steps(2, 5) == [1] and curve_steps(1, 3) == []  # ends are not snapshots


def test_curve_sampler_records_snapshots_without_changing_training(tok, base, groups, tmp_path):
    """Fig. 5 snapshots: the policy is sampled at the curve steps with its raw log π, and training
    ends with the same weights as without the hook (sampling runs under fork_rng, in eval mode)."""
    from vcb_lib.trainers import CurveSampler

    cfg = load_params(None, {"rewards.task": "sentiment", "evaluation.curve_points": 2, "evaluation.curve_prompts": 3,
                             "evaluation.max_new_tokens": 5, "evaluation.samples_per_prompt": 2})
    train_cfg = cfg_(batch_size=2, learning_rate=1e-3)
    plain = Trainer(copy.deepcopy(base), tok, groups[:6], "vcb", train_cfg, tmp_path / "plain")
    plain.train()
    hooked = Trainer(copy.deepcopy(base), tok, groups[:6], "vcb", train_cfg, tmp_path / "hooked",
                     on_step=CurveSampler(cfg, tok, tmp_path / "hooked"))
    hooked.train()
    assert max_diff(params(hooked), params(plain)) == 0.0
    files = sorted(p.name for p in (tmp_path / "hooked" / "curve").iterdir())
    assert files == ["step-00001.parquet", "step-00002.parquet"]  # 3 steps, 2 points between 0 and 3
    snap = pd.read_parquet(tmp_path / "hooked" / "curve" / "step-00001.parquet")
    assert len(snap) == 3 * 2 and set(snap.k) == {0, 1} and (snap.step == 1).all()
    # the recorded log π is that of the policy after step 1: recompute it from a replayed step
    replay = Trainer(copy.deepcopy(base), tok, groups[:6], "vcb", cfg_(batch_size=2, learning_rate=1e-3, max_steps=1),
                     tmp_path / "replay")
    replay.train()
    again = sequence_logps(replay.model, tok, list(snap.model_input), [list(map(int, r)) for r in snap.response_ids])
    assert torch.allclose(again, torch.tensor(snap.policy_logp.to_numpy(), dtype=torch.float32), atol=1e-3)


# --------------------------------------------------------------------------------------------
# work the maths does not need: shared prompts, candidates a loss never reads
# --------------------------------------------------------------------------------------------


def test_shared_prompts_train_like_the_flat_batch(tok, base, groups, tmp_path):
    """One prompt forward for its n candidates (the default) trains like n full rows: the same
    logged losses, gradient norms and tokens; parameters equal up to fp32 rounding."""
    cfg = cfg_(batch_size=2, grad_accum=2, max_steps=2, learning_rate=LR_EQ)
    runs = {}
    for share in (True, False):
        t = Trainer(copy.deepcopy(base), tok, groups[:8], "vcb", cfg, tmp_path / str(share), share_prompts=share)
        assert t.share_prompts is share
        t.train()
        runs[share] = params(t), read_log(t)
        assert json.loads((tmp_path / str(share) / "training_config.json").read_text())["share_prompts"] is share
    (p_shared, log_shared), (p_flat, log_flat) = runs[True], runs[False]
    for a, b in zip(log_shared, log_flat):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["tokens"] == b["tokens"]  # prompt + response tokens of every candidate, either way
    assert max_diff(p_shared, p_flat) < 3e-6 < max_diff(p_flat, base.state_dict()) / 30
    rm = Trainer(tiny_reward_model(), tok, preference_groups(2), "bt", cfg_(), tmp_path / "rm", score_fn=reward_scores)
    assert rm.share_prompts is False


@pytest.mark.parametrize("loss,over,kept", [("dpo", {"pairs": "best_worst"}, (0, 3)),
                                            ("slic", {"pairs": "best_worst"}, (0, 3)),
                                            ("rest", {"top_k": 2}, (0, 1))])
def test_unread_candidates_are_not_trained(tok, base, tmp_path, loss, over, kept):
    """Groups of 4 with rewards 3 > 2 > 1 > 0: DPO best-vs-worst reads candidates 0 and 3 (SLiC's
    NLL the best, 0, too), ReST top-2 reads 0 and 1. The Trainer drops the rest, which trains
    exactly like groups holding only those candidates."""
    full = [dataclasses.replace(g, rewards=[3.0, 2.0, 1.0, 0.0]) for g in make_groups(tok, base, 6, n=4, seed=3)]
    hand = [dataclasses.replace(g, response_ids=[g.response_ids[k] for k in kept], rewards=[g.rewards[k] for k in kept],
                                ref_logps=[g.ref_logps[k] for k in kept]) for g in full]
    cfg = cfg_(batch_size=3, max_steps=2, **over)
    runs = []
    for name, gs in (("full", full), ("hand", hand)):
        t = Trainer(copy.deepcopy(base), tok, gs, loss, cfg, tmp_path / name)
        t.train()
        runs.append((params(t), read_log(t)))
        saved = json.loads((tmp_path / name / "training_config.json").read_text())
        assert saved["candidates"] == {"given": len(gs) * len(gs[0].response_ids), "trained": 6 * len(kept)}
    assert max_diff(runs[0][0], runs[1][0]) == 0.0
    timing = ("elapsed", "tokens/s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in runs[0][1]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in runs[1][1]]


# --------------------------------------------------------------------------------------------
# checkpoints that cannot lie: checksums, damaged ones skipped, nothing unpickled (issue #16)
# --------------------------------------------------------------------------------------------

RESUME_CFG = dict(batch_size=2, grad_accum=2, epochs=2, save_every=2, lr_schedule="cosine", warmup_steps=2)


def dropout_model(base):
    m = copy.deepcopy(base)
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1  # the RNG states must be restored too
    return m


@pytest.fixture(scope="module")
def full_run(tok, base, groups, tmp_path_factory):
    """6 uninterrupted steps (3 per epoch), checkpoints every 2: step-000004 and step-000006 kept."""
    out = tmp_path_factory.mktemp("full")
    trainer = Trainer(dropout_model(base), tok, groups, "vcb", cfg_(**RESUME_CFG), out)
    trainer.train()
    return out, params(trainer)


def copy_run(src, dst):
    """A run folder as the uninterrupted run left it (its checkpoints, log and config), to resume."""
    import shutil

    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    for name in ("log.jsonl", "training_config.json"):
        shutil.copy(src / name, dst / name)
    return dst / "checkpoints"


class Planted:
    """Unpickling this creates ``path``: what a planted checkpoint file would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_holds_checksums_and_no_pickle(full_run):
    from vcb_lib.trainers import verify_checkpoint

    out, _ = full_run
    folder = out / "checkpoints" / "step-000006"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["checksums.json", "model.safetensors", "optimizer.pt", "rng_state_0.json",
                     "rng_state_0.safetensors", "scheduler.pt", "trainer_state.json"]
    listed = json.loads((folder / "checksums.json").read_text())["files"]
    assert sorted(listed) == [n for n in names if n != "checksums.json"]
    assert listed["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(folder / name, weights_only=True)  # tensors, numbers, lists, dicts only
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["step"], state["format"], state["sharded"]) == (6, 2, False)
    assert verify_checkpoint(folder) is None


@pytest.mark.parametrize("damage,problem", [
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda f: (f / "optimizer.pt").write_bytes(b""), r"optimizer.pt has 0 bytes, \d+ were saved"),
    (lambda f: (f / "scheduler.pt").write_bytes(bytes(b ^ 0xFF if i == 100 else b for i, b in
                                                      enumerate((f / "scheduler.pt").read_bytes()))),
     "scheduler.pt does not match its sha256"),
], ids=["weights-deleted", "optimizer-emptied", "byte-flipped"])
def test_resume_skips_a_damaged_latest_checkpoint(tok, base, groups, tmp_path, full_run, damage, problem):
    """The latest checkpoint (step 6) damaged: resume warns naming it, trains on from step 4 and
    ends with the uninterrupted run's parameters."""
    full_out, want = full_run
    ckpts = copy_run(full_out, tmp_path)
    damage(ckpts / "step-000006")
    torch.manual_seed(12345)  # a different RNG state: resume must restore the saved one
    resumed = Trainer(dropout_model(base), tok, groups, "vcb", cfg_(**RESUME_CFG), tmp_path)
    with pytest.warns(CheckpointWarning, match=f"step-000006 is damaged: {problem}"):
        summary = resumed.train(resume=True)
    assert summary["steps_this_run"] == 2  # steps 5 and 6, from step-000004
    assert max_diff(params(resumed), want) <= 1e-6
    assert [r["step"] for r in read_log(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in resumed.checkpoints()] == ["step-000004", "step-000006"]
    assert (ckpts / "damaged-step-000006").is_dir()  # kept for a look, out of the way of pruning


def test_resume_never_unpickles(tok, base, groups, tmp_path, full_run):
    """Pickle payloads planted beside an intact checkpoint (accelerate's file names) and a planted
    newer checkpoint whose checksums are right but whose optimizer and scheduler files are
    pickles that run code: nothing runs; the planted one is skipped, the intact one loaded."""
    import pickle
    import shutil

    from vcb_lib.trainers import checksum_list, verify_checkpoint

    full_out, want = full_run
    ckpts = copy_run(full_out, tmp_path / "run")
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Planted(live)))
    assert live.exists()  # the payload does run when unpickled
    markers = [tmp_path / f"ran-{i}" for i in range(4)]
    for name, marker in zip(("custom_checkpoint_0.pkl", "random_states_0.pkl"), markers):
        (ckpts / "step-000006" / name).write_bytes(pickle.dumps(Planted(marker)))
    planted = ckpts / "step-000008"
    shutil.copytree(ckpts / "step-000006", planted)
    state = json.loads((planted / "trainer_state.json").read_text())
    (planted / "trainer_state.json").write_text(json.dumps(state | {"step": 8}))
    torch.save({"state": {}, "param_groups": Planted(markers[2])}, planted / "optimizer.pt")
    torch.save({"last_epoch": Planted(markers[3])}, planted / "scheduler.pt")
    (planted / "checksums.json").write_text(json.dumps({"files": checksum_list(planted)}))
    assert verify_checkpoint(planted) is None  # checksums catch damage, not a forger: loading must be safe

    resumed = Trainer(dropout_model(base), tok, groups, "vcb", cfg_(**RESUME_CFG), tmp_path / "run")
    refused = "step-000008 is damaged: cannot be read safely: scheduler.pt: UnpicklingError: .*Unsupported global"
    with pytest.warns(CheckpointWarning, match=refused):
        summary = resumed.train(resume=True)
    assert not [m.name for m in markers if m.exists()]
    assert summary["steps_this_run"] == 0 and max_diff(params(resumed), want) <= 1e-6  # step-000006 loaded


def test_resume_with_every_checkpoint_damaged_starts_afresh(tok, base, groups, tmp_path, full_run):
    full_out, want = full_run
    ckpts = copy_run(full_out, tmp_path)
    (ckpts / "step-000006" / "model.safetensors").unlink()
    (ckpts / "step-000004" / "trainer_state.json").write_text("{not json")
    (ckpts / "step-000002").mkdir()  # a folder named like a checkpoint, holding nothing
    resumed = Trainer(dropout_model(base), tok, groups, "vcb", cfg_(**RESUME_CFG), tmp_path)
    with pytest.warns(CheckpointWarning) as caught:
        summary = resumed.train(resume=True)
    messages = [str(w.message) for w in caught]
    assert "step-000006 is damaged: model.safetensors is missing" in messages[0]
    assert "step-000004 is damaged: trainer_state.json has" in messages[1]  # its size changed
    assert "step-000002 is damaged: no checksums.json" in messages[2]
    assert "no intact checkpoint" in messages[3] and "starts from scratch" in messages[3]
    assert summary["steps_this_run"] == 6 and max_diff(params(resumed), want) <= 1e-6
    assert [r["step"] for r in read_log(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in resumed.checkpoints()] == ["step-000004", "step-000006"]


def test_two_process_checkpoints_resume_past_damage(groups, tmp_path):
    """DDP (2 gloo processes): each rank writes its RNG state, rank 0 verifies and the ranks skip
    the damaged latest checkpoint together; the resumed run ends like the uninterrupted one."""
    out = tmp_path / "two"
    launch_entry(groups[:10], out, ["training.batch_size=2", "training.save_every=1"], num_processes=2, cpu=True)
    want = load_file(out / "final" / "model.safetensors")
    ckpts = out / "checkpoints"
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step-000002", "step-000003"]
    assert {"rng_state_0.safetensors", "rng_state_1.json"} <= {p.name for p in (ckpts / "step-000003").iterdir()}
    assert not list(ckpts.rglob("*.pkl")) and not list(ckpts.rglob("*.bin"))
    (ckpts / "step-000003" / "model.safetensors").unlink()
    lines, overrides = [], ENTRY_OVERRIDES + ["training.batch_size=2", "training.save_every=1"]
    launch_subprocess(["-m", "vcb_lib.trainers", "--params", str(SMOKE), "--method", "vcb", "--candidates",
                       str(tmp_path / "two-candidates.parquet"), "--out", str(out), "--resume",
                       *sum((["--set", o] for o in overrides), [])], echo=lines.append, num_processes=2, cpu=True)
    assert any("step-000003 is damaged: model.safetensors is missing" in line for line in lines), lines[-20:]
    assert any('"steps_this_run": 1' in line for line in lines)  # step 3 again, from step-000002
    assert max_diff(load_file(out / "final" / "model.safetensors"), want) <= 1e-6
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_rng_states_round_trip_through_json_and_safetensors(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from vcb_lib.trainers import rng_states, set_rng_states

    random.random(), np.random.normal(), torch.rand(1)  # numpy now holds a cached gaussian
    tensors, plain = rng_states()
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    (tmp_path / "rng.json").write_text(json.dumps(plain))

    def draw():
        return random.random(), random.gauss(0, 1), np.random.normal(), np.random.rand(), torch.rand(3).tolist()

    first = draw()
    set_rng_states(load_file(tmp_path / "rng.safetensors"), json.loads((tmp_path / "rng.json").read_text()))
    assert draw() == first
