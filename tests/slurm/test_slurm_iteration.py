"""`sbatch slurm/iteration.sh` on a real single-node Slurm cluster (slurmctld + slurmd + munge,
started here, stopped by PID at the end; see cluster.py).

1. The tiny preset's seed -> M1 -> iteration 1 -> M2 chain as jobs: SFT and DPO on 2 tasks
   (srun, gloo), sampling and judging as 2-task job arrays (2 ranks per task) plus gather jobs;
   every job COMPLETED, the iteration's files on disk.
2. Bad input in one stage (a malformed line in the judgements build_pairs reads): its job
   FAILS, every dependent is CANCELLED (none left pending); after the fix a resubmission skips
   the finished stages and reproduces the first run's pairs.
3. Sharded sampling inside one job: srun + torch.distributed, srun --mpi=pmix + mpi4py, and
   mpirun, 2 ranks each, write exactly the records the job array wrote.

Needs root (apt-get installs Slurm, munge, PMIx and Open MPI when missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_selfreward.config import load_config
from megatron_selfreward.io import read_jsonl
from megatron_selfreward.pipeline.slurm import job_state, wait_for
from tests.conftest import REPO
from tests.score_seed import write_score_seed
from tests.slurm.cluster import LocalSlurm, job_env

CONFIG = REPO / "tests" / "slurm" / "tiny_slurm.yaml"
TIMEOUT_S = 1500

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-run")
    write_score_seed(root / "seed")
    return root / "run"


def _env(cluster: LocalSlurm) -> dict[str, str]:
    return job_env(cluster.env)


def _sbatch_iteration(cluster: LocalSlurm, out: Path, *args: str) -> list[str]:
    """Run slurm/iteration.sh as a job; the stage job ids it submitted."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", str(REPO / "slurm" / "iteration.sh"), *args],
                          cwd=REPO, env=_env(cluster), capture_output=True, text=True, check=True)
    driver = proc.stdout.strip()
    assert wait_for([driver], 300, env=cluster.env)[driver] == "COMPLETED", out.read_text()
    last = out.read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"[\d ]+", last), out.read_text()
    return last.split()


def _submitted(log: Path) -> dict[str, str]:
    """'stage (iteration t) [role]' -> job id, from the driver's output."""
    found = re.findall(r"^  (.+?): job (\d+)", log.read_text(), flags=re.M)
    return {label: job for label, job in found}


def _seed_args(run_dir: Path) -> list[str]:
    return [f"pipeline.run_dir={run_dir}", f"data.seed={run_dir.parent / 'seed'}"]


def test_sbatch_iteration_runs_the_whole_chain(cluster, run_dir):
    log = run_dir.parent / "driver-1.out"
    jobs = _sbatch_iteration(cluster, log, "--config", str(CONFIG), "--iteration", "1", *_seed_args(run_dir))
    states = wait_for(jobs, TIMEOUT_S, env=cluster.env)
    logs = run_dir / "slurm" / "logs"
    failed = {j: s for j, s in states.items() if s != "COMPLETED"}
    assert not failed, (failed, {p.name: p.read_text()[-1500:] for p in logs.glob("*")})
    submitted = _submitted(log)
    assert "sample_responses (iteration 1) [array]" in submitted and "train_dpo (iteration 1) [stage]" in submitted

    it = run_dir / "iter1"
    pairs = read_jsonl(it / "pairs.jsonl")
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert (run_dir / "models" / "M2" / "megatron" / "metadata.json").is_file()
    for manifest in ("prompts", "responses", "judgements", "pairs"):
        assert (it / f"{manifest}.manifest.json").is_file()
    for model in ("M1", "M2"):
        assert (run_dir / "models" / f"{model}.manifest.json").is_file()
        assert (run_dir / "eval" / model / "metrics.json").is_file()
    # 2 array tasks x 2 ranks split the shards (shard_size 1: 4 prompts, then 16 responses to
    # judge); a gather job assembled them
    for name, shards in (("responses", 4), ("judgements", 16)):
        engine = json.loads((it / f"{name}.manifest.json").read_text())["engine"]
        assert (engine["workers"], engine["shards_computed"]) == (4, shards), engine
    assert len(read_jsonl(it / "responses.jsonl")) == 4 * 4
    # SFT and DPO ran as 2 processes started by srun
    for model in ("M1", "M2"):
        manifest = json.loads((run_dir / "models" / f"{model}.manifest.json").read_text())
        assert (manifest["processes"], manifest["launcher"]) == (2, "slurm"), manifest


def _reset_after_judgements(run_dir: Path) -> None:
    for path in (run_dir / "iter1").glob("pairs*"):
        path.unlink()
    shutil.rmtree(run_dir / "models" / "M2")
    (run_dir / "models" / "M2.manifest.json").unlink()
    shutil.rmtree(run_dir / "eval" / "M2")


def test_bad_input_cancels_dependents_and_resubmission_skips_finished_stages(cluster, run_dir):
    it = run_dir / "iter1"
    assert (it / "pairs.jsonl").is_file(), "needs the first test's run"
    first_pairs = read_jsonl(it / "pairs.jsonl")
    judgements = (it / "judgements.jsonl").read_bytes()
    _reset_after_judgements(run_dir)
    (it / "judgements.jsonl").write_bytes(judgements + b'{"prompt_id": "broken", \n')
    finished = [run_dir / "models" / "M1.manifest.json", it / "prompts.manifest.json",
                it / "responses.manifest.json", it / "judgements.manifest.json"]
    mtimes = {p: p.stat().st_mtime_ns for p in finished}

    log = run_dir.parent / "driver-2.out"
    jobs = _sbatch_iteration(cluster, log, "--run-dir", str(run_dir), "--iteration", "1")
    submitted = _submitted(log)
    assert sorted(submitted) == ["build_pairs (iteration 1) [stage]", "evaluate (M2) [stage]",
                                 "report [stage]", "train_dpo (iteration 1) [stage]"]
    states = wait_for(jobs, TIMEOUT_S, env=cluster.env)
    failing = submitted["build_pairs (iteration 1) [stage]"]
    assert states[failing] == "FAILED"
    assert all(states[j] == "CANCELLED" for j in jobs if j != failing), states  # none left pending
    error = next((run_dir / "slurm" / "logs").glob(f"*-{failing}.out")).read_text()
    assert "judgements.jsonl" in error and "line" in error, error[-2000:]

    (it / "judgements.jsonl").write_bytes(judgements)
    log = run_dir.parent / "driver-3.out"
    jobs = _sbatch_iteration(cluster, log, "--run-dir", str(run_dir), "--iteration", "1")
    assert sorted(_submitted(log)) == sorted(submitted)  # the finished stages are not redone
    states = wait_for(jobs, TIMEOUT_S, env=cluster.env)
    assert set(states.values()) == {"COMPLETED"}, states
    assert read_jsonl(it / "pairs.jsonl") == first_pairs
    assert {p: p.stat().st_mtime_ns for p in finished} == mtimes
    assert (run_dir / "models" / "M2" / "megatron" / "metadata.json").is_file()
    status = subprocess.run([sys.executable, "-m", "megatron_selfreward.cli", "slurm", "status", "--run-dir",
                             str(run_dir)], cwd=REPO, env=_env(cluster), capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert re.search(r"train_dpo \(iteration 1\)\s+done\s+\d+ stage COMPLETED", status.stdout), status.stdout


LAUNCHERS = {
    "srun-torch": "srun --kill-on-bad-exit=1 -n 2 {cmd}",
    "srun-pmix-mpi4py": "srun --kill-on-bad-exit=1 --mpi=pmix -n 2 {cmd} executor.shard_comm=mpi",
    "mpirun": "mpirun --allow-run-as-root --oversubscribe -n 2 {cmd}",
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sharded_sampling_inside_one_job_matches_the_array(cluster, run_dir, tmp_path, launcher):
    want = read_jsonl(run_dir / "iter1" / "responses.jsonl")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("responses*", "judgements*", "pairs*"))
    cfg = load_config(copy / "config.yaml", [f"pipeline.run_dir={copy}"])
    assert cfg.pipeline.run_dir == str(copy)
    cmd = (f"{sys.executable} -m megatron_selfreward.cli stage sample_responses --iteration 1 "
           f"--config {copy / 'config.yaml'} pipeline.run_dir={copy}")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\nexport OMP_NUM_THREADS=1\n"
                      + LAUNCHERS[launcher].format(cmd=cmd) + "\n")
    out = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--parsable", "-n", "2", f"--output={out}", str(script)],
                          env=_env(cluster), capture_output=True, text=True, check=True)
    job = proc.stdout.strip()
    assert wait_for([job], 600, env=cluster.env)[job] == "COMPLETED", out.read_text()[-3000:]
    assert read_jsonl(copy / "iter1" / "responses.jsonl") == want
    manifest = json.loads((copy / "iter1" / "responses.manifest.json").read_text())
    assert manifest["engine"]["workers"] == 2, manifest
    assert job_state(job, env=cluster.env) == "COMPLETED"
