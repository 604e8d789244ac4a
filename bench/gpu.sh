#!/usr/bin/env bash
# The GPU part of the benchmarks in one run, for a GPU machine without network (e.g. the device tool's):
#   1. the library's CUDA checks (pytest -k "cuda or gpu": shared-prompt log-probs and gradients, the HF
#      sampler, `accelerate launch -m vcb_lib.trainers` on the GPU against the CPU);
#   2. bench/train_step.py at the paper's policy scale (random:pythia-2.8b, bf16 autocast, 8 (H100) or 16
#      (H200) sequences of 128 + 128 tokens per step): tokens/s, peak GPU memory, MFU, ratios against TRL's DPOTrainer;
#   3. the same with gradient checkpointing (what 2.8B needs on 40-80 GB cards), twice the sequences and
#      256-token (HH-like) prompts: ours with and without shared prompts vs TRL with precomputed references;
#   4. LoRA adapters (training.lora) at that scale: ours vs TRL's DPOTrainer with the same peft_config;
#   5. bench/logps.py (the reference pass, fp32 vs bf16) and 6. bench/sampling.py (HF fp32 vs bf16).
# Prepare on a machine with pip access: `make gpu-bundle` (wheels the GPU image lacks + the tokenizer, in
# .gpu/), then run this with .gpu carried along. Each step has its own time limit and a
# failing step does not stop the next (limits 90 + 210 + 120 + 90 + 60 + 60 s). Output: $OUT (default outputs/gpu/): gpu.log and one JSON per bench.
# Smaller, to try the script (on a CPU too): MODEL=random:pythia-70m SEQS=8 TOKENS=16 WHEELS= bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
PY=${PY:-python3}
MODEL=${MODEL:-random:pythia-2.8b}
THREADS=${THREADS:-8}
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
# sequences per step: TRL with its live reference model holds ~56 GB of fp32 weights, grads and AdamW
# states at 2.8B before activations, so 16 x 256 tokens fit an H200 (141 GB), 8 x 256 an H100 (80 GB)
SEQS=${SEQS:-$([ "${GPU_MIB:-0}" -gt 100000 ] && echo 16 || echo 8)}
TOKENS=${TOKENS:-128}  # prompt tokens and response tokens
WHEELS=${WHEELS-.gpu/wheels}
mkdir -p "$OUT"
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vcb-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/vcb-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
[ -d .gpu/cache ] && export VCB_CACHE="$PWD/.gpu/cache"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report how it ended
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  step tests "${TESTS_S:-90}" "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
    tests/test_models.py tests/test_samplers.py tests/test_trainers.py
  step train_step "${STEPS_S:-210}" "$PY" bench/train_step.py --model "$MODEL" --seqs "$SEQS" --prompt-tokens "$TOKENS" \
    --runs ours-vcb,ours-vcb-flat,ours-dpo,trl-dpo,trl-dpo-pre \
    --response-tokens "$TOKENS" --steps 5 --warmup 2 --threads "$THREADS" --json "$OUT/train_step.json"
  step train_step_checkpointed "${CKPT_S:-120}" "$PY" bench/train_step.py --model "$MODEL" --gradient-checkpointing \
    --runs ours-vcb,ours-vcb-flat,trl-dpo-pre --seqs "$((2 * SEQS))" --prompt-tokens "$((2 * TOKENS))" \
    --response-tokens "$TOKENS" --steps 4 --warmup 1 --threads "$THREADS" --json "$OUT/train_step_checkpointed.json"
  step train_step_lora "${LORA_S:-90}" "$PY" bench/train_step.py --model "$MODEL" --runs ours-vcb-lora,trl-dpo-lora \
    --seqs "$SEQS" --prompt-tokens "$TOKENS" --response-tokens "$TOKENS" --steps 5 --warmup 2 --threads "$THREADS" \
    --json "$OUT/train_step_lora.json"
  step logps "${LOGPS_S:-60}" "$PY" bench/logps.py --model "$MODEL" --batch-sizes 32 --layouts shared --pairs 128 \
    --response-tokens "$TOKENS" --threads "$THREADS" --json "$OUT/logps.json"
  step sampling "${SAMPLING_S:-60}" "$PY" bench/sampling.py --model "$MODEL" --backends hf-fp32,hf-bf16 --prompts 16 \
    --n 4 --max-new-tokens "$TOKENS" --batch-size 16 --threads "$THREADS" --json "$OUT/sampling.json"
} 2>&1 | tee "$OUT/gpu.log"
