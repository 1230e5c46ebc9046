"""`selfreward run` on the tiny preset: the produced files, their manifests, and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_selfreward.io import read_records
from megatron_selfreward.records import Judgement, Prompt, Response
from tests.conftest import REPO


def selfreward(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_selfreward.cli", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_run_writes_every_stage_output_with_consistent_counts(run_dir: Path):
    it = run_dir / "iter1"
    prompts = read_records(it / "prompts.jsonl", Prompt)
    responses = read_records(it / "responses.jsonl", Response)
    judgements = read_records(it / "judgements.jsonl", Judgement)
    assert len(prompts) == 4  # generation.prompts.num_prompts in tiny.yaml
    assert len(responses) == 4 * len(prompts)  # N = 4 per prompt
    assert {r.prompt_id for r in responses} == {p.prompt_id for p in prompts}
    assert [j.response_id for j in judgements] == [r.response_id for r in responses]
    assert all(len(j.raw_outputs) == 3 for j in judgements)  # k = 3 judge samples
    for j in judgements:
        # A failed parse is excluded, never scored 0.
        for score, reason in zip(j.sample_scores, j.failure_reasons):
            assert (score is None) == (reason is not None)
        assert j.mean_score is None or j.mean_score == pytest.approx(
            sum(s for s in j.sample_scores if s is not None) / sum(s is not None for s in j.sample_scores))
    manifest = json.loads((it / "judgements.manifest.json").read_text())
    failures = sum(r is not None for j in judgements for r in j.failure_reasons)
    assert sum(manifest["counts"]["parse_failures"].values()) == failures
    assert (run_dir / "config.yaml").is_file() and (run_dir / "models" / "M0.manifest.json").is_file()
    for name in ("responses", "judgements", "pairs"):
        assert json.loads((it / f"{name}.manifest.json").read_text())["fingerprint"]["inputs"]


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_config_change_reruns_downstream(run_dir: Path):
    it = run_dir / "iter1"
    before = {p.name: p.stat().st_mtime_ns for p in it.glob("*.manifest.json")}
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in it.glob("*.manifest.json")} == before
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={run_dir}", "judge.temperature=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in it.glob("*.manifest.json")}
    assert after["responses.manifest.json"] == before["responses.manifest.json"]
    assert after["judgements.manifest.json"] != before["judgements.manifest.json"]


def test_bad_override_is_a_clear_error_and_exit_code_2():
    proc = selfreward("run", "--config", "tiny", "judge.samples_per_respons=3")
    assert proc.returncode == 2
    assert "judge.samples_per_response" in proc.stderr
