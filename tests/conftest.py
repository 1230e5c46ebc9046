"""Shared test fixtures: repository paths and a subprocess runner for multi-process checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def run_python(args: list[str], *, nproc: int = 1, timeout: int = 300, env: dict | None = None):
    """Run a Python script (under torchrun when nproc > 1); fail with its output on error."""
    if nproc > 1:
        # --standalone picks a free port (a literal --master-port=0 reaches the workers as 0).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def process_world():
    """The 1-process world a checkpoint converter runs in: its caller opens it (`selfreward
    convert` does), so tests that call a converter directly hold one for the test."""
    from megatron_selfreward.megatron.parallel import single_process_world

    with single_process_world():
        yield
