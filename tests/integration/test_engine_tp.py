"""MegatronEngine at TP=2 (2 gloo processes) generates what it generates at TP=1.

The tiny model is saved once at TP=1 as a Megatron distributed checkpoint and loaded at TP=2
(resharded on load). Greedy and seeded-sampled outputs must be token-for-token equal, on both
TP ranks, through the direct path and through the Megatron-module path, also from a model built
for training with sequence parallelism, whose sequence parallelism is back on afterwards; with
continuous batching (rows joining running batches) and without, and with the auto batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_python


@pytest.mark.slow
def test_tp2_generation_equals_tp1(tmp_path: Path) -> None:
    run_python(["tests/engine_worker.py", "ref", "--out", str(tmp_path)], timeout=300)
    run_python(["tests/engine_worker.py", "tp2", "--out", str(tmp_path)], nproc=2, timeout=300)
    reference = json.loads((tmp_path / "tp1.json").read_text())
    ranks = [json.loads((tmp_path / f"tp2_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "TP ranks must decode identically"
    assert ranks[0]["direct_path"], "the tiny Llama runs the direct path at TP=2"
    assert ranks[0]["sp_restored"] == [True, True]
    assert ranks[0]["rows_joined"] > 0, "rows join running batches on both ranks alike"
    for path in ("direct", "modules", "sp_direct", "sp_modules", "static", "auto"):
        got = ranks[0][path]
        assert set(got) == set(reference)
        for request_id, samples in reference.items():
            for want, have in zip(samples, got[request_id], strict=True):
                assert have["tokens"] == want["tokens"], (path, request_id)
                assert have["finish"] == want["finish"]
                assert max(abs(a - b) for a, b in zip(have["logprobs"], want["logprobs"])) < 1e-4
