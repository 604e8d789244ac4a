"""Model specs, the packaged-model cache, and summed response log-probs against a plain loop.

Fast tier uses ``tiny-random`` (its tokenizer comes from the cache; the first run extracts it
from the GGUF once, ~13 s). Tests that need SmolLM2 weights are marked ``default_tier`` and run
only when selected: ``pytest tests/test_models.py -m default_tier``.
"""
import copy
import threading
import time

import pytest
import torch
from conftest import DEVICES

from vcb_lib import logps as L
from vcb_lib import models as M
from vcb_lib.config import PROJECT_ROOT


@pytest.fixture(scope="module")
def tok():
    return M.load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def model():
    return M.load_policy("tiny-random")


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def reference_logp(model, prompt_ids, response_ids) -> float:
    """Independent: one unpadded row, a python loop over response positions, float64."""
    row = torch.tensor([list(prompt_ids) + list(response_ids)], device=model.device)  # (1, T)
    with torch.no_grad():
        logits = model(row).logits[0].double()  # (T, V)
    total = 0.0
    for j in range(len(prompt_ids), row.shape[1]):  # token j is predicted at position j-1
        total += torch.log_softmax(logits[j - 1], -1)[row[0, j]].item()
    return total


PROMPTS = [
    "Hi",
    "Write a short poem about the sea, with rhymes, and make it cheerful please.",
    "What is 2 + 2?",
    "Summarise: the cat sat on the mat and then it went to sleep for a very long time.",
    "Tell me a joke.",
]
RESPONSES = [
    " Hello! How can I help you today? I can answer questions.",
    " Waves.",
    " 4<|im_end|>",  # ends with eos (== pad)
    " A cat slept.",
    " Why did the chicken cross the road? To get to the other side!",
]


# -----------------------------------------------------------------------------
# log-probs


def test_sequence_logps_matches_unpadded_loop(model, tok):
    prompts = [M.format_prompt(tok, p) for p in PROMPTS]  # mixed lengths, unsorted
    want = torch.tensor([reference_logp(model, ids(tok, p), ids(tok, r)) for p, r in zip(prompts, RESPONSES)], dtype=torch.float64)
    tok.padding_side = "left"  # what samplers set; log-probs pad right regardless
    try:
        for bs in (1, 2, 8):
            got = L.sequence_logps(model, tok, prompts, RESPONSES, batch_size=bs)
            assert got.shape == (len(prompts),) and got.dtype == torch.float32
            # 1e-5 nats, plus 1e-6 relative: a float32 sum near -150 is only resolved to 1.5e-5
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)
    finally:
        tok.padding_side = "right"


def test_pad_equals_eos_is_counted_and_padding_is_not(model, tok):
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # SmolLM2: the case this guards
    a, b = ids(tok, " yes"), ids(tok, " no thanks")
    prompt = ids(tok, "Answer briefly:")
    responses = [a + [eos], a + [eos] + b + [eos], a, b + b + b + b]  # eos inside and at the end
    prompts = [prompt] * len(responses)
    got, n = L.sequence_logps(model, tok, prompts, responses, batch_size=4, return_n_tokens=True)
    assert n.tolist() == [len(r) for r in responses]
    want = torch.tensor([reference_logp(model, prompt, r) for r in responses], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)
    # the same counts come out of the batch masks (built from lengths, not from ids == pad)
    batch = L.tokenize_pairs(tok, prompts, responses)
    assert batch["response_mask"].sum(-1).tolist() == n.tolist()
    assert batch["attention_mask"].sum(-1).tolist() == [len(prompt) + len(r) for r in responses]


def test_add_eos_appends_once(model, tok):
    eos = tok.eos_token_id
    r = ids(tok, " fine")
    p = ids(tok, "How are you?")
    plain, n0 = L.sequence_logps(model, tok, [p, p], [r, r + [eos]], return_n_tokens=True)
    added, n1 = L.sequence_logps(model, tok, [p, p], [r, r + [eos]], add_eos=True, return_n_tokens=True)
    assert n0.tolist() == [len(r), len(r) + 1] and n1.tolist() == [len(r) + 1, len(r) + 1]
    torch.testing.assert_close(added[0], plain[1])  # appended eos == explicit eos
    torch.testing.assert_close(added[1], plain[1])  # not appended twice
    assert added[0] < plain[0]  # eos adds a log-prob term


def test_prompt_tokens_are_excluded(model, tok):
    p1 = ids(tok, "Tell me a story about a dragon")
    p2 = p1[:-1] + ids(tok, " knight")[-1:]
    assert p1 != p2 and len(p1) == len(p2)
    r = ids(tok, " Once upon a time there was a dragon.")
    got, n = L.sequence_logps(model, tok, [p1, p2], [r, r], return_n_tokens=True)
    assert n.tolist() == [len(r), len(r)]
    assert abs(got[0] - got[1]) > 1e-4  # the prompt conditions the response
    assert abs(got[0].item() - reference_logp(model, p1, r)) < 1e-5
    # an off-by-one boundary (counting the last prompt token too) would give this instead:
    assert abs(got[0].item() - reference_logp(model, p1[:-1], p1[-1:] + r)) > 1e-3


def test_text_and_ids_give_the_same_result(model, tok):
    by_text = L.sequence_logps(model, tok, PROMPTS, RESPONSES)
    by_ids = L.sequence_logps(model, tok, [ids(tok, p) for p in PROMPTS], [ids(tok, r) for r in RESPONSES])
    torch.testing.assert_close(by_text, by_ids, atol=0, rtol=0)


def test_accepts_series_and_id_arrays(model, tok):
    """What a candidates table hands over: pandas columns, numpy id arrays."""
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    want = L.sequence_logps(model, tok, PROMPTS[:2], RESPONSES[:2])
    got = L.sequence_logps(model, tok, pd.Series(PROMPTS[:2]), [np.array(ids(tok, r)) for r in RESPONSES[:2]])
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_max_length_cuts_prompt_start_then_response_end(model, tok):
    p, r = ids(tok, " ".join(["word"] * 20)), ids(tok, " a b c")
    got, n = L.sequence_logps(model, tok, [p], [r], max_length=10, return_n_tokens=True)
    assert n.item() == len(r)
    assert abs(got.item() - reference_logp(model, p[-(10 - len(r)):], r)) < 1e-5
    long_r = ids(tok, " one two three four five six seven eight nine ten eleven")
    got, n = L.sequence_logps(model, tok, [p], [long_r], max_length=6, return_n_tokens=True)
    assert n.item() == 5
    assert abs(got.item() - reference_logp(model, p[-1:], long_r[:5])) < 1e-5


def test_bf16_autocast_close_to_fp32(model, tok):
    fp32 = L.sequence_logps(model, tok, PROMPTS, RESPONSES)
    bf16 = L.sequence_logps(model, tok, PROMPTS, RESPONSES, autocast_bf16=True)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # autocast really ran
    # bf16 has an 8-bit mantissa: allow 1% of the summed log-prob plus 0.05 nats
    # (measured: <= 0.02 nats, 3e-4 relative, on sums of -20 to -170 nats)
    assert ((bf16 - fp32).abs() <= 0.01 * fp32.abs() + 0.05).all(), (bf16, fp32)


def test_batch_logps_keeps_grad_and_matches(model, tok):
    m = copy.deepcopy(model).train()
    batch = L.tokenize_pairs(tok, PROMPTS, RESPONSES)
    out = L.batch_logps(m, batch)  # (B,)
    assert out.requires_grad and out.shape == (len(PROMPTS),)
    out.sum().backward()
    assert m.model.embed_tokens.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), L.sequence_logps(m, tok, PROMPTS, RESPONSES), atol=1e-5, rtol=1e-6)


def test_sequence_logps_restores_mode_and_has_no_grad(model, tok):
    model.train()
    try:
        out = L.sequence_logps(model, tok, PROMPTS[:2], RESPONSES[:2])
        assert model.training and not out.requires_grad
    finally:
        model.eval()


def test_empty_prompt_gets_bos(model, tok):
    r = ids(tok, " hello")
    got, n = L.sequence_logps(model, tok, [""], [r], return_n_tokens=True)
    assert n.item() == len(r)
    assert abs(got.item() - reference_logp(model, [tok.bos_token_id], r)) < 1e-5


def test_input_errors(model, tok):
    with pytest.raises(ValueError, match="no \\(prompt, response\\) pairs"):
        L.sequence_logps(model, tok, [], [])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        L.sequence_logps(model, tok, ["a", "b"], ["c"])
    with pytest.raises(TypeError, match="prompts must be a list"):
        L.sequence_logps(model, tok, "a", ["c"])
    with pytest.raises(ValueError, match="batch_size"):
        L.sequence_logps(model, tok, ["a"], ["c"], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        L.tokenize_pairs(tok, ["a"], ["c"], max_length=1)


# -----------------------------------------------------------------------------
# specs, loading, tokenizer


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model spec 'tiny_random'.*tiny-random"):
        M.load_policy("tiny_random")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        M.load_policy(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        M.load_tokenizer("./no/such/model")
    with pytest.raises(ValueError, match="known: packaged:smollm2-135m-instruct"):
        M.load_policy("packaged:gpt5")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        M.load_policy("tiny-random", dtype="fp8")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        M.parse_spec(str(tmp_path / "file.txt"))


def test_parse_spec_kinds(tmp_path):
    assert M.parse_spec("tiny-random") == ("random", "tiny-random")
    assert M.parse_spec("random:pythia-2.8b") == ("random", "pythia-2.8b")
    with pytest.raises(ValueError, match="unknown random architecture 'pythia-3b'; known: tiny-random, random:pythia-70m"):
        M.parse_spec("random:pythia-3b")
    assert M.parse_spec("packaged:smollm2-135m-instruct") == ("packaged", "smollm2-135m-instruct")
    assert M.parse_spec("EleutherAI/pythia-2.8b") == ("hub", "EleutherAI/pythia-2.8b")
    assert M.parse_spec(tmp_path) == ("folder", str(tmp_path))


def test_tiny_random_is_deterministic_and_leaves_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = M.load_policy("tiny-random")
    assert torch.equal(torch.rand(3), expected)  # the seeded init ran on a forked RNG
    b = M.load_policy("tiny-random")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    cfg = a.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 1, 1)
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied
    assert not a.training


def test_ensure_model_folder(tmp_path, model, tok):
    folder = M.ensure_model_folder("tiny-random", cache_dir=tmp_path)
    assert M.is_complete(folder) and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert M.ensure_model_folder("tiny-random", cache_dir=tmp_path) == folder
    saved = M.load_policy(folder)
    sa, sb = saved.state_dict(), model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert M.load_tokenizer(folder)("Hello there").input_ids == tok("Hello there").input_ids
    assert M.ensure_model_folder(folder) == folder
    assert M.ensure_model_folder("EleutherAI/pythia-2.8b") == "EleutherAI/pythia-2.8b"


# Total parameters of the Pythia suite as EleutherAI publishes them (Biderman et al., 2023, and the
# model cards): an independent check of each config in M.PYTHIA.
PYTHIA_TOTALS = {"pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016,
                 "pythia-1b": 1_011_781_632, "pythia-1.4b": 1_414_647_808, "pythia-2.8b": 2_775_208_960,
                 "pythia-6.9b": 6_857_302_016, "pythia-12b": 11_846_072_320}


@pytest.mark.parametrize("name", list(PYTHIA_TOTALS))
def test_random_pythia_has_the_published_parameter_count(name):
    from transformers import AutoModelForCausalLM

    assert set(M.PYTHIA) == set(PYTHIA_TOTALS)
    config = M.random_config(name)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PYTHIA_TOTALS[name]
    attention = model.gpt_neox.layers[0].attention
    assert attention.rotary_ndims == attention.head_size // 4  # rotary on a quarter of each head
    assert config.use_parallel_residual and not config.tie_word_embeddings


def test_random_pythia_loads_seeded_with_the_smollm2_tokenizer(tok):
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a = M.load_policy("random:pythia-70m")
    assert torch.equal(torch.rand(2), expected)  # seeded on a forked RNG
    b = M.load_policy("random:pythia-70m", dtype="bfloat16")
    assert type(a).__name__ == "GPTNeoXForCausalLM" and not a.training
    assert next(b.parameters()).dtype == torch.bfloat16
    assert torch.equal(a.lm_head.weight.to(torch.bfloat16), b.lm_head.weight)  # same seed, cast
    pythia_tok = M.load_tokenizer("random:pythia-70m")
    assert pythia_tok("Hello there").input_ids == tok("Hello there").input_ids
    assert len(pythia_tok) <= a.config.vocab_size and a.config.eos_token_id == pythia_tok.eos_token_id
    prompts, responses = ["Say hi.", "Count to three, slowly."], [[5, 6, 7], [8, 9]]
    logps = L.sequence_logps(a, pythia_tok, prompts, responses)
    assert logps.shape == (2,) and torch.isfinite(logps).all() and (logps < 0).all()


def test_tiny_random_bf16_dtype():
    m = M.load_policy("tiny-random", dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16


def test_tokenizer_has_pad_and_chat_template(tok):
    assert tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id
    text = M.format_prompt(tok, "What is the capital of France?")
    assert "What is the capital of France?" in text and text.endswith("<|im_start|>assistant\n")
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert M.format_prompt(plain, "just text") == "just text"


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("VCB_CACHE", raising=False)
    assert M.resolve_cache_dir() == PROJECT_ROOT / ".cache" / "models"
    monkeypatch.setenv("VCB_CACHE", str(tmp_path / "env"))
    assert M.resolve_cache_dir() == tmp_path / "env"
    assert M.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert M.resolve_cache_dir("rel/dir") == PROJECT_ROOT / "rel" / "dir"


def test_packaged_gguf_is_found():
    path = M.packaged_gguf_path("smollm2-135m-instruct")
    assert path.is_file() and path.suffix == ".gguf"


# -----------------------------------------------------------------------------
# atomic cache folders


def _tmp_leftovers(parent, name):
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


def test_failed_build_leaves_no_folder(tmp_path):
    def build(d):
        (d / "model.safetensors").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        M.atomic_build_dir(tmp_path / "m", build)
    assert not (tmp_path / "m").exists() and not _tmp_leftovers(tmp_path, "m")


def test_half_folder_is_rebuilt_and_whole_one_is_reused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # looks like a model, has no marker
    (tmp_path / ".m.tmp-killed").mkdir()  # a killed run's leftover
    calls = []

    def build(d):
        calls.append(1)
        (d / "config.json").write_text('{"ok": true}')
        return {"n": len(calls)}

    out = M.atomic_build_dir(tmp_path / "m", build)
    assert M.is_complete(out) and (out / "config.json").read_text() == '{"ok": true}'
    M.atomic_build_dir(tmp_path / "m", build)
    assert len(calls) == 1
    assert oct((tmp_path / "m").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "m" / "config.json").stat().st_mode & 0o777) == "0o644"


def test_concurrent_builds_build_once(tmp_path):
    calls = []

    def build(d):
        calls.append(1)
        time.sleep(0.3)
        (d / "x").write_text("x")
        return {}

    threads = [threading.Thread(target=M.atomic_build_dir, args=(tmp_path / "m", build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and M.is_complete(tmp_path / "m") and not _tmp_leftovers(tmp_path, "m")


# -----------------------------------------------------------------------------
# default tier: the real SmolLM2-135M-Instruct


@pytest.mark.default_tier
def test_packaged_conversion_matches_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "smollm2-135m-instruct"
    t0 = time.perf_counter()
    folder = M.ensure_packaged_model(name, cache_dir=tmp_path)
    t_convert = time.perf_counter() - t0
    assert folder == tmp_path / name and M.is_complete(folder)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).is_file(), f
    assert "quantization_config" not in (folder / "config.json").read_text()

    t0 = time.perf_counter()
    assert M.ensure_packaged_model(name, cache_dir=tmp_path) == folder
    t_second = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = M.load_policy(f"packaged:{name}", cache_dir=tmp_path)
    tok = M.load_tokenizer(f"packaged:{name}", cache_dir=tmp_path)
    t_cached = time.perf_counter() - t0
    assert t_second < 0.5 and t_cached < 10

    gguf = M.packaged_gguf_path(name)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    text = M.format_prompt(tok, "Name three colours.") + "Red, green and blue."
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.chat_template == ref_tok.chat_template
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others (shared cache)
    x = torch.tensor([tok(text).input_ids])  # (1, T)
    with torch.no_grad():
        err = (model(x).logits - ref(x).logits).abs().max().item()
    assert err <= 1e-4  # same float32 weights: expect 0
    print(f"\nconvert {t_convert:.1f}s, second ensure {t_second * 1e3:.1f}ms, cached load {t_cached:.2f}s, "
          f"max|Δlogit| {err:.2e}")


@pytest.mark.default_tier
def test_smollm2_logps_are_sensible():
    model = M.load_policy("packaged:smollm2-135m-instruct")
    tok = M.load_tokenizer("packaged:smollm2-135m-instruct")
    prompt = M.format_prompt(tok, "What is the capital of France? Answer in one word.")
    good, bad = L.sequence_logps(model, tok, [prompt, prompt], ["Paris", "Banana"])
    assert good > bad
    # batching on a real model: equals the unpadded loop
    prompts = [M.format_prompt(tok, p) for p in PROMPTS]
    got = L.sequence_logps(model, tok, prompts, RESPONSES, batch_size=3)
    one = L.sequence_logps(model, tok, prompts, RESPONSES, batch_size=1)
    torch.testing.assert_close(got, one, atol=1e-4, rtol=0)  # measured <= 8e-6
    # float32 log_softmax over 49152 logits (|logit| up to ~40) is off by ~1e-5 nats per token
    # against the float64 loop; measured <= 2.7e-4 on ~20-token responses
    want = torch.tensor([reference_logp(model, ids(tok, p), ids(tok, r)) for p, r in zip(prompts, RESPONSES)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------------------
# shared prompts: one prompt forward for its n continuations (training path of the Trainer)
# --------------------------------------------------------------------------------------------

def tiny_gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=128, rotary_pct=0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_shared_prompt_logps_equal_flat_batch_and_grads(model, family, checkpointing, device):
    """In float64, the shared-prompt batch (prompts left-padded, run once, KV cache indexed to the
    rows) gives the flat batch's log-probs and the same gradient, and both match the plain loop;
    with (non-reentrant, the Trainer's) gradient checkpointing as without."""
    m = (copy.deepcopy(model) if family == "llama" else tiny_gpt_neox()).double().train().to(device)
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert L.can_share_prompts(m)
    g = torch.Generator().manual_seed(1)
    rand = lambda k: torch.randint(3, 250, (k,), generator=g).tolist()  # noqa: E731
    prompts = [rand(7), rand(3), rand(1)]  # different lengths: left padding of 6 and 4 in the shared batch
    responses = [rand(5), rand(2), rand(9), rand(1), rand(4), rand(6)]
    index = [0, 0, 0, 1, 2, 2]
    shared = L.collate_shared_prompts(prompts, responses, index, pad_id=0)
    flat = L.collate_pairs([(prompts[b], r) for b, r in zip(index, responses)], pad_id=0)
    assert L.sequence_tokens(shared) == L.sequence_tokens(flat) == sum(len(prompts[b]) + len(r) for b, r in zip(index, responses))
    grads = []
    for batch in (shared, flat):
        m.zero_grad(set_to_none=True)
        out = L.batch_logps(m, {k: v.to(device) for k, v in batch.items()})  # (R,)
        (out * torch.arange(1.0, 7.0, dtype=out.dtype, device=device)).sum().backward()  # rows weighted differently
        grads.append((out.detach().cpu(), torch.cat([p.grad.flatten() for p in m.parameters()]).cpu()))
    # Llama's RMSNorm computes in float32 even in a float64 model. On the CPU a row gives the same
    # float32 values in either batch; a GPU's float64 matmuls may differ in the last bit between the
    # two batch shapes, which that float32 cast can turn into ~1e-7 relative (not measured yet)
    fp32_norm = family == "llama" and device == "cuda"
    tol = 1e-6 if fp32_norm else 1e-10
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=tol, rtol=tol)
    (g_shared, g_flat), rounding = (grads[0][1], grads[1][1]), {"llama": 1e-7, "gpt_neox": 1e-12}[family]
    assert (g_shared - g_flat).norm() <= (1e-6 if fp32_norm else rounding) * g_flat.norm()  # the shared batch
    # sums the rows' prompt gradients before Llama's float32 norm, the flat batch after it (CPU: 4e-8);
    # GPT-NeoX's LayerNorm stays in float64
    want = torch.tensor([reference_logp(m, prompts[b], r) for b, r in zip(index, responses)], dtype=torch.float64)
    torch.testing.assert_close(grads[0][0], want, atol=max(tol, 1e-9), rtol=max(tol, 1e-9))


def test_sliding_window_models_score_in_plain_rows(tok):
    """A model with sliding-window layers keeps a cache the shared-prompt path does not reproduce:
    ``sequence_logps`` scores its pairs in plain rows, which match the per-pair loop."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    assert not L.can_share_prompts(m)
    prompts, responses = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [10, 11]], [[12, 13, 14], [15], [16, 17, 18, 19, 20]]
    got = L.sequence_logps(m, tok, prompts, responses, batch_size=3)
    want = torch.tensor([reference_logp(m, p, r) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_collate_shared_prompts_layout_and_bad_input():
    b = L.collate_shared_prompts([[5, 6, 7], [8]], [[1, 2], [3], []], [0, 1, 1], pad_id=0)
    assert b["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and b["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["completion_ids"].tolist() == [[1, 2], [3, 0], [0, 0]] and b["n_tokens"].tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="prompt is empty"):
        L.collate_shared_prompts([[]], [[1]], [0], pad_id=0)
    with pytest.raises(ValueError, match="one prompt_index per response"):
        L.collate_shared_prompts([[1]], [[1], [2]], [0], pad_id=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [1, 2, 4, 16])
def test_sequence_logps_shares_repeated_prompts(model, tok, batch_size, device):
    """n candidates per prompt (interleaved, one prompt cut by max_length differently per response)
    run their prompt once; each result equals the plain per-pair loop, in input order."""
    model = copy.deepcopy(model).to(device)
    g = torch.Generator().manual_seed(2)
    rand = lambda k: torch.randint(3, 5000, (k,), generator=g).tolist()  # noqa: E731
    p0, p1 = rand(6), rand(2)
    prompts = [p0, p0, p1, p0, p1, p0]
    responses = [rand(4), rand(7), rand(3), [], rand(5), rand(2)]
    got = L.sequence_logps(model, tok, prompts, responses, batch_size=batch_size, max_length=11)
    want = []
    for p, r in zip(prompts, responses):
        p = p[-max(1, 11 - len(r)):]  # encode_pairs keeps the end of a prompt that does not fit
        want.append(reference_logp(model, p, r) if r else 0.0)
    assert got.device.type == "cpu"  # results come back to the CPU whatever the model's device
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=1e-5)
