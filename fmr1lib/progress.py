"""Progress bars that leave a readable notebook, wherever the code runs.

Interactive (a terminal, JupyterLab): ``tqdm.auto``'s bar, a widget in a notebook. Headless
notebook runs (``cli.run_notebook``: ``make reproduce``, ``python -m fmr1lib notebook``, which
set ``HEADLESS_ENV`` in the kernel's environment) are different: nobody watches the widget, and
the executed notebook keeps only the text it showed when it was created (a bar frozen at
``0/4``), while text bars and training progress on ``sys.stderr`` end up in the notebook as red
stderr blocks. There every bar is a text bar written to ``terminal()``: the kernel process's own
stderr, the terminal that started the run, never a cell's output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

HEADLESS_ENV = "FMR1_PROGRESS_LINES"
"""Set (to the seconds between two progress lines of a training run) by ``cli.run_notebook`` in
the environment of the kernels it starts: the notebook runs headless."""


def headless() -> bool:
    """Whether this process is a notebook kernel started by a headless run (``HEADLESS_ENV``)."""
    return bool(os.environ.get(HEADLESS_ENV))


_TERMINAL: dict[int, TextIO] = {}


def terminal() -> TextIO:
    """Where progress goes that must not land in a notebook: ``sys.stderr`` in a plain process;
    inside a Jupyter kernel (whose ``sys.stderr`` is a cell's stderr output) the file the
    kernel's own stderr was before the kernel captured it, i.e. the terminal of the process
    that started the kernel."""
    stream = sys.stderr
    if not type(stream).__module__.startswith("ipykernel"):
        return stream
    try:
        fd = stream.fileno()  # ipykernel: a copy of the original stderr descriptor
    except (OSError, ValueError, AttributeError):
        # The kernel did not capture the descriptor (it never does under pytest): the
        # original stderr object still writes to the terminal, not to the notebook.
        return sys.__stderr__ if sys.__stderr__ is not None else stream
    if fd not in _TERMINAL:
        _TERMINAL[fd] = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 (kept open)
    return _TERMINAL[fd]


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar: ``tqdm.auto`` normally, a text bar on ``terminal()`` in a headless kernel.

    Takes tqdm's arguments (``desc``, ``total``, ``leave``, ``disable``, ...).
    """
    if headless():
        from tqdm.std import tqdm as text_tqdm

        kwargs.setdefault("file", terminal())
        return text_tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
