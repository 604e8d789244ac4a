"""The candidate table D_t: schema, reference log-probs, resume after a real interruption, batches."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from vcb_lib.data import CANDIDATE_COLUMNS, build_candidates, candidate_groups, collate_groups, load_prompts
from vcb_lib.logps import sequence_logps
from vcb_lib.models import load_policy, load_tokenizer
from vcb_lib.samplers import HFSampler

BUILD = r'''
import sys, time
from vcb_lib.data import build_candidates, load_prompts
from vcb_lib.models import load_policy, load_tokenizer
from vcb_lib.samplers import HFSampler

class Slow(HFSampler):  # a pause per shard gives the test a window to kill the process mid-run
    def generate(self, *a, **k):
        out = super().generate(*a, **k)
        time.sleep(float(sys.argv[2]))
        return out

model, tok = load_policy("tiny-random"), load_tokenizer("tiny-random")
prompts = load_prompts("sentiment", "train")[:6]
table = build_candidates(prompts, Slow(model, tok, batch_size=2), sys.argv[1], n=3, temperature=1.0,
                         max_new_tokens=6, seed=7, ref_model=model, tokenizer=tok, shard_size=2, progress=False)
table.to_parquet(sys.argv[1] + "/table.parquet")
'''


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny-random"), load_tokenizer("tiny-random")


def test_schema_and_reference_logps(tiny, tmp_path):
    model, tok = tiny
    prompts = load_prompts("sentiment", "train")[:3]
    table = build_candidates(prompts, HFSampler(model, tok), tmp_path, n=2, temperature=1.0, max_new_tokens=5,
                             seed=0, ref_model=model, tokenizer=tok, progress=False)
    assert list(table.columns) == CANDIDATE_COLUMNS
    assert len(table) == 6 and sorted(table.k.unique()) == [0, 1]
    assert table.reward.isna().all()  # filled by the reward stage
    assert (table.n_tokens == table.response_ids.map(len)).all()
    ref = sequence_logps(model, tok, list(table.model_input), [list(x) for x in table.response_ids])
    torch.testing.assert_close(torch.tensor(table.ref_logp.values, dtype=torch.float32), ref)
    torch.testing.assert_close(torch.tensor(table.sampler_logp.values, dtype=torch.float32), ref, atol=1e-3, rtol=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n"] == 2 and manifest["seed"] == 0


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([sys.executable, str(script), str(whole), "0"], check=True, timeout=600, capture_output=True)
    proc = subprocess.Popen([sys.executable, str(script), str(cut), "3"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((cut / "shards").glob("shard-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # a real interruption, mid-run
    proc.wait()
    done = list((cut / "shards").glob("shard-*.parquet"))
    assert 1 <= len(done) < 3, "the kill should land after the first shard and before the last"
    subprocess.run([sys.executable, str(script), str(cut), "0"], check=True, timeout=600, capture_output=True)
    a, b = pd.read_parquet(whole / "table.parquet"), pd.read_parquet(cut / "table.parquet")
    assert len(b) == 18 and not b.duplicated(["prompt_id", "k"]).any()
    pd.testing.assert_frame_equal(a, b)
    assert not list((cut / "shards").glob(".*.tmp"))  # no half-written shard left behind


def test_changed_settings_keep_old_shards_aside(tiny, tmp_path):
    model, tok = tiny
    prompts = load_prompts("sentiment", "train")[:2]
    kw = dict(temperature=1.0, max_new_tokens=4, seed=0, progress=False)
    build_candidates(prompts, HFSampler(model, tok), tmp_path, n=2, **kw)
    with pytest.warns(UserWarning, match="previous shards were moved"):
        table = build_candidates(prompts, HFSampler(model, tok), tmp_path, n=3, **kw)
    assert len(table) == 6
    assert len(list(tmp_path.glob("stale-*/shard-*.parquet"))) == 1


def test_errors(tiny, tmp_path):
    sampler = HFSampler(*tiny)
    with pytest.raises(ValueError, match="at least one prompt"):
        build_candidates([], sampler, tmp_path, n=2, temperature=1.0, max_new_tokens=4, seed=0)
    with pytest.raises(ValueError, match="n must be >= 2"):
        build_candidates(load_prompts("sentiment")[:1], sampler, tmp_path, n=1, temperature=1.0,
                         max_new_tokens=4, seed=0)


def test_groups_and_collation_fold_back(tiny):
    _, tok = tiny
    table = pd.DataFrame({
        "prompt_id": ["a", "a", "b", "b", "b"], "model_input": ["Hi", "Hi", "Yo there", "Yo there", "Yo there"],
        "k": [1, 0, 0, 1, 2], "response_ids": [[5, 6], [7], [8, 9, 10], [11], [12, 13]],
        "reward": [0.5, 0.1, 1.0, 2.0, 3.0], "ref_logp": [-2.0, -1.0, -3.0, -1.0, -2.0]})
    groups = candidate_groups(table)
    assert [g.prompt_id for g in groups] == ["a", "b"]
    assert groups[0].response_ids == [[7], [5, 6]] and groups[0].rewards == [0.1, 0.5]  # k order
    batch = collate_groups(tok, groups)
    assert batch["mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["n_tokens"].tolist() == [[1, 2, 0], [3, 1, 2]]
    assert batch["input_ids"].shape[0] == 5 and batch["response_mask"].sum().item() == 9
    torch.testing.assert_close(batch["ref_logps"][1], torch.tensor([-3.0, -1.0, -2.0]))
    shared = collate_groups(tok, groups, share_prompts=True)  # each prompt once, rows point at it
    assert shared["prompt_ids"].shape[0] == 2 and shared["prompt_index"].tolist() == [0, 0, 1, 1, 1]
    assert shared["completion_mask"].sum().item() == 9 and torch.equal(shared["n_tokens"], batch["n_tokens"])
    p_b = len(tok("Yo there", add_special_tokens=False).input_ids)
    cut = collate_groups(tok, groups, share_prompts=True, max_length=p_b + 1)  # cuts b's prompt per response
    assert "prompt_index" not in cut and cut["input_ids"].shape[0] == 5  # so: the flat batch
    with pytest.raises(ValueError, match="without reward"):
        candidate_groups(table.assign(reward=[0.5, None, 1.0, 2.0, 3.0]))
