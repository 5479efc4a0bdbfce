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
