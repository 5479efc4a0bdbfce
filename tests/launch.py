"""Shared pieces of the tests that start ``accelerate launch`` on two CPU processes (gloo)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

NEEDS_GLOO = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
"""Module mark of a test that launches a gloo process group."""


def free_port() -> int:
    """A TCP port free on this host now (for ``--main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The launched processes' environment: one thread each (they share the machine's cores)
    and the checkout on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


def launch_command(config: Path, script: Path, *args: str) -> list[str]:
    """``accelerate launch --config_file config script args`` on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(free_port()), str(script), *args]
