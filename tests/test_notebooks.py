"""The executed notebooks in ``notebooks/`` still run against the current API.

Each notebook's code cells run in order in one namespace (no Jupyter needed); an exception in any
cell fails the test and names the notebook and cell.
"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert NOTEBOOKS, "notebooks/ holds no executed notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c.get("outputs") for c in code), f"{path.name} is not executed (a code cell has no output)"
    namespace: dict = {}
    for i, cell in enumerate(code):
        source = "".join(cell["source"])
        try:
            exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path.name}, code cell {i} failed: {e!r}") from e
