import os
from pathlib import Path

import pytest
import torch

from vcb_lib.config import PROJECT_ROOT

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The suite's tolerances are CPU float32/float64 ones: on a machine with a GPU, accelerate would move
# in-process Trainers there. Tests that are about the GPU ask for the `device` parameter below
# (and start their own processes without this variable).
os.environ.setdefault("ACCELERATE_USE_CPU", "true")

# Parametrise a test with `@pytest.mark.parametrize("device", DEVICES)`: the CPU always, a CUDA GPU
# where there is one (CI has none; bench/gpu.sh runs `pytest -k cuda` on a lent GPU machine).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]

PARAMETERS_CELL = (
    'params_path: str = "../params/smoke.yaml"  # parameter file; the runner passes an absolute path\n'
    'overrides: list = []  # the --set overrides, applied on top of the file'
)
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (vcb)", "language": "python"}


def make_notebook(path: Path, *code: str, parameters: str | None = PARAMETERS_CELL) -> Path:
    """A stripped notebook with a tagged parameters cell followed by ``code`` cells."""
    import nbformat  # here, not at the top: the GPU machine's test run (bench/gpu.sh) has no Jupyter

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNELSPEC})
    if parameters is not None:
        nb.cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    nb.cells += [nbformat.v4.new_code_cell(c) for c in code]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (tiny models: threads cost more than they give, and
    results do not depend on the reduction order). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The tiny-random model's tokenizer (SmolLM2's vocabulary)."""
    from vcb_lib.models import load_tokenizer

    return load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def base():
    """The tiny-random policy (a 2-layer Llama, random weights): π_sft of the trainer tests."""
    from vcb_lib.models import load_policy

    return load_policy("tiny-random")


@pytest.fixture
def smoke_params() -> Path:
    return PROJECT_ROOT / "params" / "smoke.yaml"
