"""Checkpoint I/O runs with one intra-op thread, so gloo's worker thread never gets an OpenMP team.

A collective that moves large tensors copies them on gloo's worker thread; with two intra-op
threads OpenMP starts a worker for that thread and keeps it, and every later op of the process
ran about twice as slow (parallel.serial_intra_op has the numbers). The premise is checked in a
child process (this one must not be slowed), the checkpoint functions in this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.megatron import checkpoint
from megatron_selfreward.megatron.model import build_model
from megatron_selfreward.megatron.parallel import single_process_world
from tests.conftest import CONFIGS, REPO

CHILD = textwrap.dedent("""
    import json, os
    import torch, torch.distributed as dist
    from megatron_selfreward.megatron.parallel import serial_intra_op, single_process_world

    def threads():
        return set(os.listdir("/proc/self/task"))

    with single_process_world():
        torch.ones(1 << 22).add_(1)  # this thread's own OpenMP team exists
        big = torch.randn(1 << 23)
        out = [torch.empty_like(big)]
        before = threads()
        with serial_intra_op():
            dist.all_gather(out, big)
            inside = torch.get_num_threads()
        serial = threads() - before
        restored = torch.get_num_threads()
        dist.all_gather(out, big)
        plain = threads() - before
    print(json.dumps({"serial": len(serial), "plain": len(plain), "inside": inside,
                      "restored": restored}))
""")


def test_large_collective_leaves_an_extra_thread_unless_serial() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["inside"] == 1 and result["restored"] == 2
    assert result["serial"] == 0, "serial_intra_op: no thread left behind"
    assert result["plain"] >= 1, "the premise: a multi-threaded collective leaves a worker behind"


def test_checkpoint_save_and_load_use_one_intra_op_thread(tmp_path, monkeypatch) -> None:
    from megatron.core import dist_checkpointing

    seen: list[tuple[str, int]] = []
    for name in ("save", "load"):
        original = getattr(dist_checkpointing, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            seen.append((_name, torch.get_num_threads()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist_checkpointing, name, recorded)
    cfg = load_config(CONFIGS / "tiny.yaml")
    threads = torch.get_num_threads()
    with single_process_world():
        model = build_model(cfg)
        checkpoint.save_model(model, tmp_path / "ckpt")
        checkpoint.load_model(model, tmp_path / "ckpt")
    assert seen == [("save", 1), ("load", 1)]
    assert torch.get_num_threads() == threads
