"""Two Slurm nodes on this machine (tests/slurm/multinode.py: one network namespace, host name
and /etc/hosts per node; slurmctld and munged beside them; all torn down at the end).

1. torch.distributed (gloo) across the nodes through srun: 2 nodes x 2 tasks at TP=2 x DP=2 on
   the tiny model, the rendezvous taken by our own Slurm handling (megatron/parallel.py: master =
   first host of SLURM_JOB_NODELIST); TP groups inside a node, DP across; the 5-step losses
   equal one process's.
2. `sbatch slurm/iteration.sh` with the stage jobs on both nodes (tiny_multinode.yaml): every job
   COMPLETED, SFT and DPO on both nodes, the judging array's two tasks on different nodes (the
   job logs name the host; a sampling task may wait for a node busy with M1's evaluation), and
   prompts/responses/judgements/pairs equal to one process's.
3. Sharded sampling by MPI ranks on the two nodes (`srun --mpi=pmix`, mpi4py): the records of 2.
4. A node dies (its slurmd and every process on it) while the sampling array runs: the node goes
   DOWN, its task ends NODE_FAIL, every later stage is cancelled; with the node back, a
   resubmission finishes and the records equal 2.'s, none lost or doubled.

Needs root (network namespaces; apt-get installs Slurm, munge, PMIx and Open MPI when missing).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from megatron_selfreward.hostlist import expand_nodelist
from megatron_selfreward.io import read_jsonl
from megatron_selfreward.pipeline.slurm import job_state, wait_for
from tests.conftest import REPO, run_python
from tests.score_seed import write_score_seed
from tests.slurm.cluster import job_env
from tests.slurm.multinode import MultiNodeSlurm

CONFIG = REPO / "tests" / "slurm" / "tiny_multinode.yaml"
RECORDS = ("prompts", "responses", "judgements", "pairs")
TIMEOUT_S = 900

pytestmark = [pytest.mark.slow, pytest.mark.multinode]


def _sbatch(cluster: MultiNodeSlurm, script: Path, *options: str, args: tuple[str, ...] = ()) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", *options, str(script), *args],
                          env=job_env(cluster.env), capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _job_script(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(["#!/bin/bash", "set -euo pipefail", "export OMP_NUM_THREADS=1", *lines, ""]))
    return path


def _run_nodes(cluster: MultiNodeSlurm, job: str) -> str:
    """NodeList of a finished job, from the job completion log (no slurmdbd here)."""
    for line in (cluster.root / "jobcomp.txt").read_text().splitlines():
        if f"JobId={job} " in line:
            return re.search(r"NodeList=(\S+)", line).group(1)
    raise AssertionError(f"job {job} is not in the job completion log")


# -- 1 -----------------------------------------------------------------------------------------


def test_tp_inside_nodes_dp_across_them_matches_one_process(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    run_python(["-m", "tests.slurm.multinode_worker", "ref", "--out", str(tmp_path)])
    script = _job_script(tmp_path / "layout.sh", f"srun --kill-on-bad-exit=1 --cpus-per-task=1 python3 -m "
                                                  f"tests.slurm.multinode_worker layout --out {tmp_path}")
    out = tmp_path / "layout.out"
    job = _sbatch(cluster, script, "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}")
    assert wait_for([job], 600, env=cluster.env)[job] == "COMPLETED", out.read_text()[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    nodes = expand_nodelist(ranks[0]["nodelist"])
    assert nodes == ["node1", "node2"]
    for r in ranks:
        assert (r["launcher"], r["world_size"], r["master_addr"]) == ("slurm", 4, nodes[0]), r
        assert r["hostname"] == r["slurm_node"]  # each task ran on the node Slurm says
    host = {r["rank"]: r["hostname"] for r in ranks}
    assert [host[i] for i in range(4)] == ["node1", "node1", "node2", "node2"]
    for r in ranks:
        assert {host[i] for i in r["tp_ranks"]} == {r["hostname"]}  # TP inside the node
        assert {host[i] for i in r["dp_ranks"]} == {"node1", "node2"}  # DP across the nodes

    ref = json.loads((tmp_path / "losses_ref.json").read_text())
    got = json.loads((tmp_path / "losses_layout.json").read_text())
    assert len(got) == len(ref) == 5 and ref[-1] != ref[0]
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (got, ref)


# -- 2 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm2-run")
    write_score_seed(root / "seed")
    return root / "run"


def _submit_iteration(cluster: MultiNodeSlurm, out: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """slurm/iteration.sh as a job: the stage job ids, and 'stage [role]' -> job id."""
    driver = _sbatch(cluster, REPO / "slurm" / "iteration.sh", f"--output={out}", args=args)
    assert wait_for([driver], 300, env=cluster.env)[driver] == "COMPLETED", out.read_text()
    text = out.read_text()
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"[\d ]+", last), text
    return last.split(), dict(re.findall(r"^  (.+?): job (\d+)", text, flags=re.M))


def _one_process_records(run_dir: Path, dest: Path) -> dict[str, list]:
    """Iteration 1's prompts, responses, judgements and pairs redone in one plain process from
    `run_dir`'s seed and M1."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(*(f"{name}*" for name in RECORDS)))
    code = (
        "from megatron_selfreward.config import load_config\n"
        "from megatron_selfreward.pipeline.local import run_local\n"
        "from megatron_selfreward.pipeline.schedule import find_stage, plan\n"
        f"cfg = load_config({str(dest / 'config.yaml')!r}, ['pipeline.run_dir={dest}', 'executor.kind=local'])\n"
        "names = ('generate_prompts', 'sample_responses', 'judge_responses', 'build_pairs')\n"
        "specs = [find_stage(plan(cfg), name, 1) for name in names]\n"
        "run_local(cfg, specs)\n"
    )
    run_python(["-c", code], timeout=600)
    return {name: read_jsonl(dest / "iter1" / f"{name}.jsonl") for name in RECORDS}


def _task_hosts(logs: Path, stage: str) -> list[str]:
    """The host of each array task of a stage, from the line the job launcher writes."""
    hosts = []
    for log in sorted(logs.glob(f"*-{stage}-i1-*_*.out")):
        found = re.findall(r"^selfreward: (\S+): ", log.read_text(), flags=re.M)
        assert found, log.read_text()[-2000:]
        hosts.append(found[0])
    return hosts


def test_sbatch_iteration_spreads_the_stage_jobs_over_both_nodes(two_node_cluster, run_dir, tmp_path):
    cluster = two_node_cluster
    jobs, submitted = _submit_iteration(cluster, run_dir.parent / "driver-1.out", "--config", str(CONFIG),
                                        "--iteration", "1", f"pipeline.run_dir={run_dir}",
                                        f"data.seed={run_dir.parent / 'seed'}")
    states = wait_for(jobs, TIMEOUT_S, env=cluster.env)
    logs = run_dir / "slurm" / "logs"
    failed = {j: s for j, s in states.items() if s != "COMPLETED"}
    assert not failed, (failed, {p.name: p.read_text()[-1500:] for p in logs.glob("*")})

    # DPO on both nodes, one task each; the array tasks on different nodes
    dpo = submitted["train_dpo (iteration 1) [stage]"]
    assert expand_nodelist(_run_nodes(cluster, dpo)) == ["node1", "node2"]
    manifest = json.loads((run_dir / "models" / "M2.manifest.json").read_text())
    assert (manifest["processes"], manifest["launcher"]) == (2, "slurm"), manifest
    # Each array task takes a whole node. Judging starts when both nodes are free, so its two
    # tasks run side by side; a sampling task may wait for M1's evaluation to free a node.
    hosts = {stage: _task_hosts(logs, stage) for stage in ("sample_responses", "judge_responses")}
    assert sorted(hosts["judge_responses"]) == ["node1", "node2"], hosts
    assert len(hosts["sample_responses"]) == 2 and set(hosts["sample_responses"]) <= {"node1", "node2"}, hosts

    want = _one_process_records(run_dir, tmp_path / "one")
    for name in RECORDS:
        got = read_jsonl(run_dir / "iter1" / f"{name}.jsonl")
        assert got == want[name], name
    assert len(want["responses"]) == 4 * 4 and want["pairs"]


# -- 3 -----------------------------------------------------------------------------------------


def _copy_before_sampling(run_dir: Path, dest: Path) -> Path:
    """`run_dir` as it was before iteration 1's sampling: M1, prompts, M1's evaluation."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(
        "responses*", "judgements*", "pairs*", "M2", "M2.manifest.json", "report", "slurm"))
    shutil.rmtree(dest / "eval" / "M2", ignore_errors=True)
    return dest


def test_mpi_ranks_on_both_nodes_shard_the_sampling(two_node_cluster, run_dir, tmp_path):
    cluster = two_node_cluster
    want = read_jsonl(run_dir / "iter1" / "responses.jsonl")
    copy = _copy_before_sampling(run_dir, tmp_path / "run")
    stage = (f"python3 -m megatron_selfreward.cli stage sample_responses --iteration 1 --config "
             f"{copy / 'config.yaml'} pipeline.run_dir={copy} executor.shard_comm=mpi")
    script = _job_script(tmp_path / "mpi.sh", f"srun --kill-on-bad-exit=1 --mpi=pmix --cpus-per-task=2 --label {stage}")
    out = tmp_path / "mpi.out"
    job = _sbatch(cluster, script, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={out}")
    assert wait_for([job], 600, env=cluster.env)[job] == "COMPLETED", out.read_text()[-4000:]
    assert expand_nodelist(_run_nodes(cluster, job)) == ["node1", "node2"]
    log = out.read_text()
    # task 0 on node1, task 1 on node2 (one task a node), each one rank of a 2-rank MPI world
    for task in (0, 1):
        assert re.search(rf"^{task}: .*worker {task} of 2 \(mpi\[2\]\)", log, flags=re.M), log[-3000:]
    assert read_jsonl(copy / "iter1" / "responses.jsonl") == want
    engine = json.loads((copy / "iter1" / "responses.manifest.json").read_text())["engine"]
    assert (engine["workers"], engine["shards_computed"]) == (2, 4), engine


# -- 4 -----------------------------------------------------------------------------------------


def _array_tasks(cluster: MultiNodeSlurm, array_job: str) -> list[tuple[str, str, str]]:
    """(task id, state, node) of each task of a job array still known to squeue."""
    proc = subprocess.run(["squeue", "-h", "-r", "-j", array_job, "-o", "%i %T %N"], env=cluster.env,
                          capture_output=True, text=True)
    return [tuple(line.split()) for line in proc.stdout.splitlines() if len(line.split()) == 3]


@contextlib.contextmanager
def _watch_rewrites(paths: list[Path]) -> Iterator[set[Path]]:
    """The paths replaced (a new inode: shards are written by rename) while the block runs,
    watched until the stage's gather removes them."""
    inodes = {path: path.stat().st_ino for path in paths}
    rewritten: set[Path] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path, inode in inodes.items():
                try:
                    if path.stat().st_ino != inode:
                        rewritten.add(path)
                except FileNotFoundError:
                    pass
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield rewritten
    finally:
        stop.set()
        watcher.join()


def test_a_node_dying_mid_array_cancels_the_rest_and_a_resubmission_finishes(two_node_cluster, run_dir, tmp_path):
    cluster = two_node_cluster
    want = {name: read_jsonl(run_dir / "iter1" / f"{name}.jsonl") for name in RECORDS}
    copy = _copy_before_sampling(run_dir, tmp_path / "run")
    args = ("--run-dir", str(copy), "--iteration", "1", f"pipeline.run_dir={copy}")
    jobs, submitted = _submit_iteration(cluster, tmp_path / "driver-1.out", *args)
    array = submitted["sample_responses (iteration 1) [array]"]
    assert submitted["sample_responses (iteration 1) [array]"] == jobs[0]

    deadline = time.time() + 300
    while not any(state == "RUNNING" and node == "node2" for _, state, node in _array_tasks(cluster, array)):
        assert time.time() < deadline, _array_tasks(cluster, array)
        time.sleep(0.5)
    time.sleep(3)  # its stage process is up, loading the model
    on_node2 = [task for task, state, node in _array_tasks(cluster, array) if node == "node2"]
    assert len(on_node2) == 1 and cluster.pids_in("node2")
    cluster.crash("node2")
    cluster.wait_state("node2", "down", timeout_s=120)

    states = wait_for(jobs, TIMEOUT_S, env=cluster.env)
    assert "NODE_FAIL" in states[array] and "CANCELLED" not in states[array], states
    assert all(states[j] == "CANCELLED" for j in jobs[1:]), states  # none left pending
    shards = sorted((copy / "iter1").glob("responses.shards/*/shard_*.jsonl"))
    assert len(shards) < 4, shards  # the dead node's shards are missing

    cluster.start_slurmd("node2")
    cluster.wait_idle(timeout_s=120)
    jobs_2, submitted_2 = _submit_iteration(cluster, tmp_path / "driver-2.out", *args)
    assert sorted(submitted_2) == sorted(submitted)  # nothing of iteration 1 was finished
    with _watch_rewrites(shards) as rewritten:
        states = wait_for(jobs_2, TIMEOUT_S, env=cluster.env)
    assert set(states.values()) == {"COMPLETED"}, states
    assert not rewritten, rewritten  # the shards finished before the crash were reused, not redone
    for name in RECORDS:
        assert read_jsonl(copy / "iter1" / f"{name}.jsonl") == want[name], name
    manifest = json.loads((copy / "iter1" / "responses.manifest.json").read_text())
    assert (manifest["counts"]["responses"], manifest["engine"]["requests"]) == (16, 4), manifest
    assert (copy / "models" / "M2" / "megatron" / "metadata.json").is_file()
    assert job_state(jobs_2[-1], env=cluster.env) == "COMPLETED"
