"""What a reader of an executed notebook sees: every figure inline, no log noise.

* ``test_headless_notebook_reads_as_a_narrative`` executes notebook 01 as ``make reproduce``
  does (``cli.run_notebook``: papermill, ``MPLBACKEND=Agg`` from ``make test``), on the own-data
  example profile (the run ``test_own_data_notebooks.py`` counts too), and reads the executed
  file: one ``image/png`` output per ``plotting.fig_*`` or ``study_plots.fig_*`` call,
  no stderr output, no progress bar (frozen or not), no stray ``Out`` value, and the HTML page
  written beside it with every figure embedded.
* ``test_every_figure_displays_in_an_interactive_kernel`` runs a kernel as JupyterLab does (no
  ``MPLBACKEND``: the inline backend) and draws three figures in a row, then a plain
  ``plt.subplots()`` figure: each must display.

Collected after the notebooks (``make test``, ``make test-notebooks``); ``notebook`` tier.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parents[1]
HEADLESS_NOTEBOOK = "01_data_construction"  # the cheapest notebook with figures and progress bars

# A tqdm bar's text: "desc:  40%|####      | 2/5 [...]".
BAR = re.compile(r"(\d+)%\|")

FIGURE_MODULES = ("plotting", "study_plots")
"""The modules whose ``fig_*`` functions draw a figure."""


def figure_calls(source: str) -> int:
    """How many ``plotting.fig_*(...)`` and ``study_plots.fig_*(...)`` calls a cell's source
    makes."""
    return sum(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr.startswith("fig_") and isinstance(n.func.value, ast.Name)
               and n.func.value.id in FIGURE_MODULES for n in ast.walk(ast.parse(source)))


def output_text(out: dict) -> str:
    if out["output_type"] == "stream":
        return out["text"]
    return str(out.get("data", {}).get("text/plain", ""))


@pytest.fixture(scope="module")
def executed(own_data_notebook):
    return own_data_notebook(HEADLESS_NOTEBOOK)


def test_headless_notebook_reads_as_a_narrative(executed):
    nb = nbformat.read(executed, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    n_calls = n_images = 0
    for i, cell in enumerate(code):
        calls = figure_calls(cell.source)
        images = sum("image/png" in o.get("data", {}) for o in cell.outputs)
        assert images == calls, f"code cell {i}: {calls} figure calls, {images} images inline"
        n_calls, n_images = n_calls + calls, n_images + images
        for out in cell.outputs:
            text = output_text(out)
            assert not (out["output_type"] == "stream" and out["name"] == "stderr"), \
                f"code cell {i} wrote to stderr: {text[:300]!r}"
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {}), \
                f"code cell {i} holds a widget (a progress bar frozen at {text[:80]!r})"
            frames = [m.group(1) for m in BAR.finditer(text.split("\r")[-1])]
            assert all(f == "100" for f in frames), f"code cell {i}: progress bar left at {frames}"
            assert out["output_type"] != "execute_result", \
                f"code cell {i} has an Out value: {text[:80]!r}"
    assert n_calls >= 3 and n_images == n_calls
    html = executed.with_suffix(".html").read_text(encoding="utf-8")
    assert html.count("data:image/png") >= n_images


def test_every_figure_displays_in_an_interactive_kernel(tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "import matplotlib.pyplot as plt\nfrom fmr1lib import plotting, study_plots",
        "study_plots.fig_claims({'seeds': [0, 1], 'claims': []});",
        "plotting.fig_training_curves({'plain': [{'step': 1, 'ce': 2.0}, {'step': 2, 'ce': 1.0}]}, ['ce']);",
        "study_plots.fig_data_efficiency([{'variant': 'grpo', 'prompts': 8, 'accuracy': 0.5}]);",
        "fig, ax = plt.subplots()\nax.plot([0, 1], [1, 0]);",
    )]
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # as JupyterLab starts it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    client = NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    shown = [sum("image/png" in o.get("data", {}) for o in c.outputs) for c in nb.cells[1:]]
    assert shown == [1, 1, 1, 1], f"images per cell: {shown} (every figure must display once)"
    json.dumps(nb)  # the outputs are plain JSON
