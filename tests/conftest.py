import os
from pathlib import Path

import nbformat
import pytest

from vcb_lib.config import PROJECT_ROOT

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PARAMETERS_CELL = (
    'params_path: str = "../params/smoke.yaml"  # parameter file; the runner passes an absolute path\n'
    'overrides: list = []  # the --set overrides, applied on top of the file'
)
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (vcb)", "language": "python"}


def make_notebook(path: Path, *code: str, parameters: str | None = PARAMETERS_CELL) -> Path:
    """A stripped notebook with a tagged parameters cell followed by ``code`` cells."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNELSPEC})
    if parameters is not None:
        nb.cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    nb.cells += [nbformat.v4.new_code_cell(c) for c in code]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def smoke_params() -> Path:
    return PROJECT_ROOT / "params" / "smoke.yaml"
