"""Throughput accounting and `selfreward profile` on a real tiny run (M0 -> M1 -> M2).

The run is `selfreward run --config tiny` with the score seed, so every manifest, metrics.jsonl
and the report's throughput.json are the real files; the checks recompute each figure by hand
from those files and fail if a field is wrong.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.score_seed import SCORE_SFT_OVERRIDES, write_score_seed

pytestmark = pytest.mark.slow


def selfreward(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_selfreward.cli", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


# Tiny preset by hand (L 2, h 64, f 160, 4 heads of 16, 2 KV groups, V 512): GEMM parameters per
# layer Q 64x64 + O 64x64 + K,V 2 x 64x32 + MLP 3 x 64x160 = 43,008; x 2 layers + output 64x512
# -> N = 118,784, 6 N = 712,704; causal-halved attention 12 L h s / 2 = 768 s.
def tiny_flops_per_token(seq_len: float) -> float:
    return 712_704 + 768 * seq_len


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("tp")
    seed = write_score_seed(root / "seed")
    run_dir = root / "tiny"
    args = ["--config", "tiny", f"pipeline.run_dir={run_dir}", f"data.seed={seed}", *SCORE_SFT_OVERRIDES]
    proc = selfreward("run", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, args


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_training_mfu_from_the_run_files(tiny_run):
    run_dir, _ = tiny_run
    tp = json.loads((run_dir / "report" / "throughput.json").read_text())
    assert tp["conventions"]["causal_attention_halved"] is True
    peak = tp["peak"]
    # Measured on this CPU once, in the tiny preset's dtype, and cached for the next report.
    assert peak["device"] == "cpu" and peak["dtype"] == "float32" and peak["flop_s_per_device"] > 1e8
    assert json.loads((run_dir / "report" / "peak_flops.json").read_text()) == peak
    train = {row["run"]: row for row in tp["training"]}
    assert set(train) == {"SFT -> M1", "DPO -> M2"}
    for label, model, sequences_per_step in (("SFT -> M1", "M1", 4), ("DPO -> M2", "M2", 8)):
        records = _metrics(run_dir / "models" / model / "metrics.jsonl")
        tokens = sum(r["tokens"] for r in records)
        seconds = sum(r["step_time_s"] for r in records)
        seq = min(tokens / (len(records) * sequences_per_step), 128)
        row = train[label]
        assert row["steps"] == len(records) and row["tokens"] == tokens
        assert row["tokens_per_s"] == pytest.approx(tokens / seconds)
        assert row["attention_seq_len"] == pytest.approx(seq)
        assert row["flops_per_token"] == pytest.approx(tiny_flops_per_token(seq))
        assert row["mfu"] == pytest.approx(tokens / seconds * tiny_flops_per_token(seq)
                                           / peak["flop_s_per_device"])
        assert 0 < row["mfu"] < 1
    manifest = json.loads((run_dir / "models" / "M1.manifest.json").read_text())
    assert manifest["counts"]["steps"] == len(_metrics(run_dir / "models" / "M1" / "metrics.jsonl"))


def test_generation_split_stage_times_and_memory_from_the_run_files(tiny_run):
    run_dir, _ = tiny_run
    tp = json.loads((run_dir / "report" / "throughput.json").read_text())
    gen = {row["stage"]: row for row in tp["generation"]}
    for label in ("iter1/responses", "iter1/judgements"):
        engine = json.loads((run_dir / f"{label}.manifest.json").read_text())["engine"]
        row = gen[label]
        assert row["prefill_tokens"] == engine["prefill_tokens_computed"]
        assert row["prefill_tokens_per_s"] == pytest.approx(engine["prefill_tokens_computed"]
                                                            / engine["prefill_time_s"])
        assert row["decode_tokens_per_s"] == pytest.approx(engine["decode_tokens"] / engine["decode_time_s"])
        assert row["decode_mean_batch"] == pytest.approx(engine["decode_row_steps"] / engine["decode_steps"])
        assert row["output_tokens_per_engine_s"] == pytest.approx(
            engine["decode_tokens"] / (engine["prefill_time_s"] + engine["decode_time_s"]))
    manifests = sorted(p for p in run_dir.rglob("*.manifest.json") if "report" not in p.parts)
    stages = {row["stage"]: row for row in tp["stages"]}
    for path in manifests:
        label = str(path.relative_to(run_dir))[: -len(".manifest.json")]
        assert stages[label]["wall_time_s"] == json.loads(path.read_text())["wall_time_s"]
    # The report was written inside `selfreward run`: its process peak is the run's.
    memory = tp["memory"]["run"]
    assert memory["covers_run"] is True
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert 100 * 2**20 < memory["peak_rss_bytes"] <= children_peak
    text = (run_dir / "report" / "report.md").read_text()
    assert "| run (whole run) |" in text and "| MFU |" in text


def test_profile_a_stage_in_a_scratch_copy(tiny_run, tmp_path):
    run_dir, args = tiny_run
    real = run_dir / "iter1" / "responses.manifest.json"
    before = real.stat().st_mtime_ns
    out = tmp_path / "prof"
    proc = selfreward("profile", "sample_responses", "--iteration", "1", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trace = json.loads((out / "trace.json").read_text())  # valid Chrome-trace JSON
    events = trace["traceEvents"]
    complete = [e for e in events if e.get("ph") == "X"]
    assert len(complete) > 100
    assert any(e["name"] == "aten::mm" for e in complete)  # the model's GEMMs were recorded
    assert all({"ts", "dur", "pid", "tid"} <= set(e) for e in complete)
    assert any("Input Dims" in e.get("args", {}) for e in complete)  # record_shapes
    summary = json.loads((out / "profile.json").read_text())
    assert summary["ran"] is True and summary["top_ops"] and summary["memory"]["peak_rss_bytes"] > 0
    assert "Self CPU time total" in proc.stdout and "aten::" in (out / "top_ops.txt").read_text()
    # The real run is untouched; the scratch copy is gone.
    assert real.stat().st_mtime_ns == before and not (out / "run").exists()
