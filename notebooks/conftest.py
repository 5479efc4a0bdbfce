"""nbval settings for the notebooks (``make test`` and ``pytest notebooks``)."""

from __future__ import annotations

import pytest

NBVAL_OUTPUT_TIMEOUT_S = 120
"""How long nbval waits for a finished cell's output messages. Its own value is a fixed 5 s: on a
loaded 2-core machine the outputs of a cell that had run came later, and the cell failed with
"Timeout of 5 seconds exceeded waiting for output". A cell's own time limit is unchanged."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's cell items
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S


OWN_DATA_PROFILE = "jsonl_example"
"""The own-data example profile (``params/jsonl_example/``) the notebooks also run on."""


@pytest.fixture(scope="session")
def own_data_notebook():
    """``run(notebook)``: the notebook executed on ``OWN_DATA_PROFILE`` as ``make reproduce``
    executes it (``cli.run_notebook``, no progress lines), once per session: the executed-notebook
    checks and the own-data tests read the same run."""
    from fmr1lib import cli

    done: dict[str, object] = {}

    def run(notebook: str):
        if notebook not in done:
            done[notebook] = cli.run_notebook(notebook, OWN_DATA_PROFILE, progress=False)
        return done[notebook]

    return run
