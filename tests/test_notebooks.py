"""Notebook hygiene: stored stripped, with a kernelspec and one documented parameters cell."""
import ast

import nbformat
import pytest

from vcb_lib.config import PROJECT_ROOT
from vcb_lib.runner import declared_parameters, discover

NOTEBOOKS = [s.path for s in discover()]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no NN_<name>.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_stripped_with_kernelspec(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "missing kernelspec"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_annotated_documented_literals(path):
    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    for line in cells[0].source.splitlines():
        if not line.strip():
            continue
        node = ast.parse(line).body[0]
        assert isinstance(node, ast.AnnAssign), f"not an annotated assignment: {line!r}"
        ast.literal_eval(node.value)  # a literal, so papermill can override it
        assert "#" in line, f"parameter without a comment: {line!r}"
    declared = declared_parameters(path)  # what papermill itself can parse
    assert {"params_path", "overrides"} <= set(declared)


def test_readme_lists_every_notebook():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert path.name in readme, f"README's notebook table misses {path.name}"
