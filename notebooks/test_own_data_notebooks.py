"""Notebooks 01-05 on the own-data example profile, as ``make test`` runs them.

``params/jsonl_example/`` is what ``python -m fmr1lib profile new`` writes for the records of
``tests/data/jsonl_example/`` (400 hand-made scenes from ``scripts/make_jsonl_study.py``, 112x84
px, no warm-up file, some records without boxes, no shortcut cue);
``tests/test_owndata.py::test_the_example_profile_is_what_profile_new_writes`` keeps the two
equal. Each notebook runs top to bottom through papermill (``cli.run_notebook``, as ``make
reproduce PROFILE=jsonl_example`` runs it; executed copies in ``runs/jsonl_example/notebooks/``;
the ``own_data_notebook`` fixture of ``notebooks/conftest.py`` runs each once per session),
in order, and ends in its own assert cells: the FocusShapes-only checks (cue, colour chance
level) skip with a printed reason, notebook 03 tests anchoring's held-out gain paired per record.
A failing cell fails its notebook's test with the cell's error.

Collected after the tiny profile's notebooks (``notebook`` tier).
"""

from __future__ import annotations

import pytest

from fmr1lib import cli

pytestmark = pytest.mark.notebook

PROFILE = "jsonl_example"  # notebooks/conftest.py OWN_DATA_PROFILE


@pytest.mark.parametrize("notebook", cli.NOTEBOOK_ORDER)
def test_notebook_runs_on_the_own_data_example(notebook, own_data_notebook):
    path = own_data_notebook(notebook)  # notebook 01 already ran for test_executed_notebooks.py
    assert path.name == f"{notebook}.ipynb" and path.is_file()
    assert path.parent.parent.name == PROFILE
