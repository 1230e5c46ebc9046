"""`selfreward run` on the tiny preset: the whole loop M0 -> M1 -> M2, its files, and resume.

The seed is `tests/score_seed.py`'s (a random-init model learns to write "Score: k" from it), so
the iteration yields real preference pairs and DPO trains M2 on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_selfreward.io import read_records
from megatron_selfreward.records import Judgement, PreferencePair, Prompt, Response
from tests.conftest import REPO
from tests.score_seed import SCORE_SFT_OVERRIDES, write_score_seed


def selfreward(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_selfreward.cli", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def run_args(run_dir: Path, seed: Path, *extra: str) -> list[str]:
    return ["run", "--config", "tiny", f"pipeline.run_dir={run_dir}", f"data.seed={seed}",
            *SCORE_SFT_OVERRIDES, *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("run")
    seed = write_score_seed(root / "seed")
    out = root / "tiny"
    proc = selfreward(*run_args(out, seed))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, seed, proc.stdout


@pytest.mark.slow
def test_run_trains_m1_and_m2_and_writes_every_stage(tiny_run):
    run_dir, _, stdout = tiny_run
    for model in ("M0", "M1", "M2"):
        assert (run_dir / "models" / model / "megatron" / "metadata.json").is_file()
        assert (run_dir / "models" / f"{model}.manifest.json").is_file()
    for model in ("M1", "M2"):  # M1 against M0, M2 against M1
        assert (run_dir / "eval" / model / "metrics.json").is_file()
    for model in ("M1", "M2"):
        assert (run_dir / "models" / model / "metrics.jsonl").is_file()
        assert not (run_dir / "models" / model / "checkpoints").exists()  # removed once finished
    for name in ("ift", "ranked_train", "eft_eval", "eval_prompts", "eft_train"):
        assert (run_dir / "seed" / f"{name}.jsonl").is_file()
    assert (run_dir / "seed" / "ift.manifest.json").is_file()
    assert (run_dir / "seed" / "eft_train.manifest.json").is_file()
    sft = json.loads((run_dir / "models" / "M1.manifest.json").read_text())
    assert sft["counts"]["ift_examples"] == 72 and sft["counts"]["steps"] == 200
    dpo = json.loads((run_dir / "models" / "M2.manifest.json").read_text())
    pairs = read_records(run_dir / "iter1" / "pairs.jsonl", PreferencePair)
    assert len(pairs) > 0 and dpo["counts"]["pairs"] == len(pairs)
    # every stage's manifest carries the peak memory measured while it ran (one process here)
    for manifest in (run_dir / "models" / "M1.manifest.json", run_dir / "iter1" / "responses.manifest.json"):
        memory = json.loads(manifest.read_text())["memory"]
        assert 50 * 2**20 < memory["peak_rss_bytes"] < 20 * 2**30 and memory["wall_time_s"] > 0
    assert (dpo["processes"], dpo["launcher"]) == (1, "single")
    assert "[1/" in stdout and "train_dpo (iteration 1)" in stdout and "ETA" in stdout


@pytest.mark.slow
def test_iteration_files_have_consistent_counts(tiny_run):
    it = tiny_run[0] / "iter1"
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
    # Each manifest counts only its own stage's engine work (one engine serves several stages).
    sampled = json.loads((it / "responses.manifest.json").read_text())["engine"]
    assert (sampled["requests"], sampled["samples"]) == (len(prompts), len(responses))
    judged = json.loads((it / "judgements.manifest.json").read_text())["engine"]
    assert (judged["requests"], judged["samples"]) == (len(responses), 3 * len(responses))
    manifest = json.loads((it / "judgements.manifest.json").read_text())
    failures = sum(r is not None for j in judgements for r in j.failure_reasons)
    assert sum(manifest["counts"]["parse_failures"].values()) == failures
    assert not (it / "responses.shards").exists() and not (it / "judgements.shards").exists()
    for name in ("prompts", "responses", "judgements", "pairs"):
        assert json.loads((it / f"{name}.manifest.json").read_text())["fingerprint"]["inputs"]


@pytest.mark.slow
def test_rerun_skips_everything_and_a_judge_change_reruns_downstream_only(tiny_run):
    run_dir, seed, _ = tiny_run
    manifests = sorted(run_dir.rglob("*.manifest.json"))
    before = {p: p.stat().st_mtime_ns for p in manifests}
    proc = selfreward(*run_args(run_dir, seed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage_lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    # Every stage is skipped; the report (if the run has one) is always rewritten.
    assert all(line.endswith("(done)") for line in stage_lines if "] report" not in line), stage_lines
    manifests = [p for p in manifests if "report" not in p.parts]
    assert {p: p.stat().st_mtime_ns for p in manifests} == {p: before[p] for p in manifests}
    proc = selfreward(*run_args(run_dir, seed, "judge.temperature=0.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in manifests}
    it = run_dir / "iter1"
    assert after[it / "responses.manifest.json"] == before[it / "responses.manifest.json"]
    assert after[run_dir / "models" / "M1.manifest.json"] == before[run_dir / "models" / "M1.manifest.json"]
    assert after[it / "judgements.manifest.json"] != before[it / "judgements.manifest.json"]


@pytest.mark.slow
def test_stage_command_runs_one_stage_by_name(tiny_run):
    run_dir, seed, _ = tiny_run
    args = ["--config", "tiny", f"pipeline.run_dir={run_dir}", f"data.seed={seed}", *SCORE_SFT_OVERRIDES]
    (run_dir / "iter1" / "pairs.manifest.json").unlink()
    proc = selfreward("stage", "build_pairs", "--iteration", "1", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "iter1" / "pairs.manifest.json").is_file()
    proc = selfreward("stage", "build_pairs", "--iteration", "1", *args)
    assert proc.returncode == 0 and "(done)" in proc.stdout
    proc = selfreward("stage", "train_dpo", "--iteration", "7", *args)
    assert proc.returncode == 2 and "sample_responses --iteration 1" in proc.stderr


def test_bad_override_is_a_clear_error_and_exit_code_2():
    proc = selfreward("run", "--config", "tiny", "judge.samples_per_respons=3")
    assert proc.returncode == 2
    assert "judge.samples_per_response" in proc.stderr


@pytest.mark.slow
def test_training_stages_run_under_torchrun_when_nproc_per_node_is_2(tmp_path):
    seed = write_score_seed(tmp_path / "seed")
    run_dir = tmp_path / "run"
    proc = selfreward(*run_args(run_dir, seed, "executor.nproc_per_node=2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # training ran as one 2-process torchrun world; rank 0 announced the stage and wrote the manifest
    assert proc.stdout.count("\ntrain_sft -> ") == 1 and proc.stdout.count("\ntrain_dpo (iteration 1) -> ") == 1
    for model in ("M1", "M2"):
        assert (run_dir / "models" / model / "megatron" / "metadata.json").is_file()
        manifest = json.loads((run_dir / "models" / f"{model}.manifest.json").read_text())
        assert manifest["counts"]["steps"] > 0 and (manifest["processes"], manifest["launcher"]) == (2, "torchrun")
    # sampling and judging were split over the 2 ranks too
    for name in ("responses", "judgements"):
        engine = json.loads((run_dir / "iter1" / f"{name}.manifest.json").read_text())["engine"]
        assert engine["workers"] == 2, engine


def _copy_without(run_dir: Path, dest: Path, *patterns: str) -> Path:
    import shutil

    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(*patterns))
    return dest


@pytest.mark.slow
def test_sampling_split_over_two_torchrun_ranks_equals_one_process(tiny_run, tmp_path):
    """Data-parallel sharded generation: each rank computes every other shard, rank 0 gathers
    in input order; the records equal a one-process run of the same shards. And generation has a
    layout of its own: with training at PP=2 (which generation cannot run) and
    generation.tensor_parallel_size=2, the two ranks form one TP=2 replica, loaded from the TP=1
    checkpoint resharded, with the same records."""
    run_dir, seed, _ = tiny_run
    results = {}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    own_layout = ["parallel.pipeline_model_parallel_size=2", "generation.tensor_parallel_size=2"]
    for name, launcher, layout in (("one", [], []), ("two", torchrun, []),
                                   ("tp2", torchrun, own_layout)):
        copy = _copy_without(run_dir, tmp_path / name, "responses*", "judgements*", "pairs*")
        # torchrun takes `-m megatron_selfreward.cli` as its own --module flag
        cmd = [sys.executable, *launcher, "-m", "megatron_selfreward.cli", "stage", "sample_responses",
               "--iteration", "1", "--config", "tiny", f"pipeline.run_dir={copy}", f"data.seed={seed}",
               *SCORE_SFT_OVERRIDES, "pipeline.shard_size=1", *layout]
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        results[name] = (read_records(copy / "iter1" / "responses.jsonl", Response),
                         json.loads((copy / "iter1" / "responses.manifest.json").read_text()))
    (one, _), (two, manifest), (tp2, tp2_manifest) = results["one"], results["two"], results["tp2"]
    assert [r.to_dict() for r in two] == [r.to_dict() for r in one] and len(one) == 16
    assert manifest["engine"]["workers"] == 2 and manifest["engine"]["shards_computed"] == 4
    assert manifest["engine"]["samples"] == 16  # summed over both ranks
    assert [r.to_dict() for r in tp2] == [r.to_dict() for r in one]
    assert tp2_manifest["engine"]["workers"] == 1 and tp2_manifest["engine"]["samples"] == 16


@pytest.mark.slow
def test_quick_preset_completes_with_its_forced_scores_marked(tmp_path):
    # The built-in seed cannot teach a 2-layer random model to write "Score: x": the tiny
    # preset forces every score (judge.force_score), and the run says so instead of stopping.
    run_dir = tmp_path / "run"
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "models" / "M2" / "megatron" / "metadata.json").is_file()
    judged = json.loads((run_dir / "iter1" / "judgements.manifest.json").read_text())["counts"]
    assert judged["forced_score_samples"] == judged["judge_samples"] == 48  # 4 prompts x 4 x 3
    pairs = json.loads((run_dir / "iter1" / "pairs.manifest.json").read_text())["counts"]["pairs"]
    assert pairs > 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "| 48/48 |" in report  # the forced-scores column of the judge-health table
    assert f"warning: iter1: only {pairs} preference pairs" in proc.stdout
