"""The tutorial notebook runs offline, end to end, and what it prints holds.

1. The committed notebook is the one ``examples/make_tutorial.py`` writes, without outputs.
2. Its cells tagged ``needs-hub`` are removed and the rest is executed in a fresh kernel with nbclient, offline,
   files and the card cache under ``tmp_path``. Any cell that raises fails the test (the notebook itself asserts
   that switching the top feature off, everything frozen, moves the reader by exactly minus its edge).
3. From the outputs: the printed change equals minus the printed edge, and the pages it wrote exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "tutorial.ipynb"
HUB_TAG = "needs-hub"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def load_generator():
    spec = importlib.util.spec_from_file_location("make_tutorial", ROOT / "examples" / "make_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_is_the_generated_one_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    built = load_generator().build()
    assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells] == \
           [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in built.cells], \
        "examples/tutorial.ipynb differs from examples/make_tutorial.py: run `python examples/make_tutorial.py`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    hub = [c for c in code if HUB_TAG in c.metadata.get("tags", [])]
    assert hub and len(hub) < len(code), "the GPT-2 small cells are tagged needs-hub, the mini cells are not"
    assert any('load_suite("gpt2-small"' in c.source for c in hub)


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_tutorial_runs_offline(tmp_path):
    from saes.suite import MINI_DIR

    if not (MINI_DIR / "cfg.json").is_file():
        pytest.skip("the mini suite is not built (saes/mini/cfg.json)")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if HUB_TAG not in c.metadata.get("tags", [])]
    nb.cells.append(nbformat.v4.new_code_cell("import circuits; print('circuits imported from', circuits.__file__)"))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TUTORIAL_OUT=str(out), CIRCUITS_CARDS_CACHE=str(tmp_path / "cards"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)  # raises CellExecutionError if any cell fails

    text = _stdout(nb)
    edge = re.search(r"^edge weight:\s+([-+][\d.]+)$", text, re.M)
    change = re.search(r"^change, everything frozen:\s+([-+][\d.]+)$", text, re.M)
    live = re.search(r"^change, real model:\s+([-+][\d.]+)$", text, re.M)
    assert edge and change and live, text
    assert float(change.group(1)) == pytest.approx(-float(edge.group(1)), abs=2e-6 + 1e-4 * abs(float(edge.group(1))))
    assert float(edge.group(1)) != 0
    assert "writes, feature off:" in text and "label: " in text

    mini = out / "mini"
    dashboards = list((mini / "dashboards").glob("*.html"))
    assert len(dashboards) == 1 and dashboards[0].with_suffix(".scorecard.json").is_file()
    page = (mini / "graph.html").read_text(encoding="utf-8")
    payload = json.loads(re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', page, re.S).group(1))
    linked = {k: c["dashboard"] for k, c in payload["cards"].items() if c["dashboard"]}
    assert linked == {dashboards[0].stem.replace("_f", ":"): f"dashboards/{dashboards[0].name}"}  # the card opens it
    assert (mini / "graph.safetensors").is_file() and any((tmp_path / "cards").iterdir())
    where = re.search(r"^circuits imported from (.+)$", text, re.M)
    assert where and Path(where.group(1)).resolve().is_relative_to(ROOT), "the kernel must import this checkout"
