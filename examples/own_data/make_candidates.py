"""How candidates.jsonl was made (run once; the file ships): 4 responses of 48 tokens per train prompt
of prompts.jsonl from the packaged SmolLM2-135M-Instruct, scored by reward.py, one row per candidate.

    .venv/bin/python examples/own_data/make_candidates.py
"""
import json
from pathlib import Path

from vcb_lib.config import load_params
from vcb_lib.data import task_of, task_prompts
from vcb_lib.models import format_prompt, load_policy, load_tokenizer
from vcb_lib.samplers import HFSampler
from vcb_lib.user_data import chat_input

HERE = Path(__file__).parent
cfg = load_params(HERE.parents[1] / "params" / "own_data.yaml")
spec = cfg.models.policy
model, tok = load_policy(spec, cache_dir=cfg.models.cache_dir), load_tokenizer(spec, cache_dir=cfg.models.cache_dir)
rows = task_prompts(task_of(cfg), "train")
prompts = [format_prompt(tok, chat_input(r)) for r in rows]
out = HFSampler(model, tok, batch_size=16).generate(prompts, 4, 1.0, 48, seed=7)
source = [json.loads(line) for line in (HERE / "prompts.jsonl").read_text().splitlines()]
by_text = {(s["prompt"] if isinstance(s["prompt"], str) else s["prompt"][-1]["content"]): s["prompt"] for s in source}
import importlib.util  # noqa: E402

reward = importlib.util.spec_from_file_location("reward", HERE / "reward.py")
module = importlib.util.module_from_spec(reward)
reward.loader.exec_module(module)
with open(HERE / "candidates.jsonl", "w") as f:
    for r, completions in zip(rows, out):
        texts = [c.text for c in completions]
        for text, value in zip(texts, module.score([r["prompt"]] * len(texts), texts)):
            f.write(json.dumps({"prompt": by_text[r["prompt"]], "response": text, "reward": round(value, 4)},
                               ensure_ascii=False) + "\n")
print(f"{sum(len(c) for c in out)} candidates of {len(rows)} prompts -> {HERE / 'candidates.jsonl'}")
