"""Samplers: both backends report log-probs that agree with logps.sequence_logps; seeding."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES

from vcb_lib.logps import sequence_logps
from vcb_lib.models import format_prompt, load_policy, load_tokenizer
from vcb_lib.samplers import HFSampler, resolve_backend, vllm_available

PROMPTS = ["Write a short review of the film 'Jaws'.", "How do I boil an egg?", "Name three rivers."]


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny-random"), load_tokenizer("tiny-random")


@pytest.mark.parametrize("device", DEVICES)
def test_hf_logps_agree_with_sequence_logps(tiny, device):
    model, tok = tiny
    model = copy.deepcopy(model).to(device)
    before = torch.cuda.get_rng_state() if device == "cuda" else None
    sampler = HFSampler(model, tok, batch_size=2)
    prompts = [format_prompt(tok, p) for p in PROMPTS]
    out = sampler.generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=0)
    assert [len(cs) for cs in out] == [3, 3, 3]
    flat = [c for cs in out for c in cs]
    assert all(c.finish_reason in ("stop", "length") and 1 <= len(c.token_ids) <= 10 for c in flat)
    ref = sequence_logps(model, tok, [p for p in prompts for _ in range(3)], [c.token_ids for c in flat])
    got = torch.tensor([c.logp for c in flat])
    # fp32, sums of ~10 token log-probs of magnitude ~10: agreement to 1e-3 absolute.
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
    if device == "cuda":  # sampling seeds its own fork of the GPU generator, not the caller's
        assert torch.equal(torch.cuda.get_rng_state(), before)


def test_hf_reports_raw_logps_at_other_temperatures(tiny):
    model, tok = tiny
    out = HFSampler(model, tok).generate(PROMPTS[:1], n=2, temperature=0.7, max_new_tokens=6, seed=1, top_p=0.9)
    ref = sequence_logps(model, tok, PROMPTS[:1] * 2, [c.token_ids for c in out[0]])
    torch.testing.assert_close(torch.tensor([c.logp for c in out[0]]), ref, atol=1e-3, rtol=0)


def test_hf_seeding_is_per_batch_position(tiny):
    model, tok = tiny
    sampler = HFSampler(model, tok, batch_size=1)
    whole = sampler.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=6, seed=3)
    resumed = sampler.generate(PROMPTS[1:], n=2, temperature=1.0, max_new_tokens=6, seed=3, first_index=1)
    assert [[c.token_ids for c in cs] for cs in whole[1:]] == [[c.token_ids for c in cs] for cs in resumed]
    other = sampler.generate(PROMPTS, n=2, temperature=1.0, max_new_tokens=6, seed=4)
    assert [[c.token_ids for c in cs] for cs in whole] != [[c.token_ids for c in cs] for cs in other]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "non-empty list"),
    (dict(n=0), "n must be >= 1"),
    (dict(temperature=0), "temperature must be > 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_requests(tiny, kwargs, message):
    args = dict(prompts=PROMPTS, n=2, temperature=1.0, max_new_tokens=4, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        HFSampler(*tiny).generate(**args)


def test_backend_resolution():
    assert resolve_backend("hf") == "hf"
    assert resolve_backend("auto") == ("vllm" if vllm_available() else "hf")
    with pytest.raises(ValueError, match="unknown sampling backend 'tpu'; allowed: auto, hf, vllm"):
        resolve_backend("tpu")


VLLM_AGREEMENT = r'''
import json, sys, torch
from vcb_lib.logps import sequence_logps
from vcb_lib.models import load_policy, load_tokenizer, ensure_model_folder
from vcb_lib.samplers import VLLMSampler
if __name__ == "__main__":
    folder = ensure_model_folder("tiny-random")
    sampler = VLLMSampler(folder, dtype="float32", seed=0, max_model_len=512)
    prompts = ["How do I boil an egg?", "Name three rivers."]
    out = sampler.generate(prompts, n=3, temperature=1.0, max_new_tokens=10, seed=0)
    again = sampler.generate(prompts[1:], n=3, temperature=1.0, max_new_tokens=10, seed=0, first_index=1)
    sampler.close()  # the engine's worker processes stop here
    model, tok = load_policy("tiny-random"), load_tokenizer("tiny-random")
    flat = [c for cs in out for c in cs]
    ref = sequence_logps(model, tok, [p for p in prompts for _ in range(3)], [c.token_ids for c in flat])
    print(json.dumps({"vllm": [c.logp for c in flat], "hf": ref.tolist(),
                      "resume_same": [c.token_ids for c in again[0]] == [c.token_ids for c in out[1]]}))
'''


@pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (make vllm)")
def test_vllm_logps_agree_with_sequence_logps(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(VLLM_AGREEMENT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith('{"vllm"'))  # vLLM logs to stdout too
    result = json.loads(line)
    # vLLM's CPU kernels accumulate in another order: agreement to 1e-2 on sums of ~10 tokens.
    torch.testing.assert_close(torch.tensor(result["vllm"]), torch.tensor(result["hf"]), atol=1e-2, rtol=0)
    assert result["resume_same"]


@pytest.mark.parametrize("device", DEVICES)
def test_hf_prefill_once_samples_what_generate_samples(tiny, device):
    """The sampler's prompt-once prefill draws the same tokens as ``generate(num_return_sequences=n)``
    with the same seed: prompts of different lengths (left padding), a float64 model so that no
    rounding can flip a draw."""
    from vcb_lib.logps import _pad_id, encode_pairs
    from vcb_lib.samplers import _seed

    model, tok = tiny
    model = copy.deepcopy(model).double().to(device)
    prompts = [format_prompt(tok, p) for p in PROMPTS]
    got = HFSampler(model, tok, batch_size=len(prompts)).generate(prompts, n=3, temperature=1.0, max_new_tokens=8, seed=5)
    ids = [p for p, _ in encode_pairs(tok, prompts, [[]] * len(prompts))]
    P = max(map(len, ids))
    assert len(set(map(len, ids))) > 1  # left padding is exercised
    pad = _pad_id(tok)
    input_ids = torch.tensor([[pad] * (P - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in ids], device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[0] if device == "cuda" else [], device_type="cuda"):
        torch.manual_seed(_seed(5, 0))
        ref = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=8, num_return_sequences=3, pad_token_id=pad,
                             eos_token_id=tok.eos_token_id)[:, P:].cpu()
    for row, c in enumerate(c for cs in got for c in cs):
        assert c.token_ids == ref[row, :len(c.token_ids)].tolist()


def test_hf_samples_a_checkpointed_model_in_training_mode(tiny):
    """transformers keeps no cache in checkpointed layers of a training model: the sampler then
    lets ``generate`` expand the prompts itself (and recompute the sequence each step), and still
    samples n completions per prompt whose first tokens are eval mode's (later ones may differ by
    rounding: the random tiny model's distribution is nearly flat)."""
    model, tok = tiny
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts = [format_prompt(tok, p) for p in PROMPTS[:2]]
    kw = dict(n=2, temperature=1.0, max_new_tokens=5, seed=7)
    train = HFSampler(model.train(), tok).generate(prompts, **kw)
    evaluation = HFSampler(model.eval(), tok).generate(prompts, **kw)
    assert [len(cs) for cs in train] == [2, 2] and all(len(c.token_ids) == 5 for cs in train for c in cs)
    assert [[c.token_ids[0] for c in cs] for cs in train] == [[c.token_ids[0] for c in cs] for cs in evaluation]
