"""The Slurm executor's rendering and worker arithmetic, without a cluster (tests/slurm/ submits
the same scripts to a real one)."""

from __future__ import annotations

import shlex

import pytest

from megatron_selfreward.config import ConfigError, load_config
from megatron_selfreward.pipeline.schedule import find_stage, plan
from megatron_selfreward.pipeline.slurm import job_shape, render_script, stages_to_submit
from megatron_selfreward.pipeline.workers import _within_array, shard_comm
from megatron_selfreward.stages.shards import Workers
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def _cfg(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", ["pipeline.run_dir=/scratch/runs/r70", *overrides])


def _sbatch(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            options[key] = value
    return options


def _command(script: str) -> list[str]:
    return shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))


def test_dpo_job_of_llama2_70b_takes_every_gpu_of_its_nodes(tmp_path):
    cfg = _cfg("llama2_70b", f"model.path={tmp_path}")  # an HF directory on the cluster
    spec = find_stage(plan(cfg), "train_dpo", 1)
    script = render_script(cfg, spec, workdir=REPO)
    opts = _sbatch(script)
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"]) == ("4", "8", "8")
    assert opts["time"] == "24:00:00" and opts["kill-on-invalid-dep"] == "yes"
    assert opts["job-name"] == "sr-r70-train_dpo-i1"
    assert opts["output"] == "/scratch/runs/r70/slurm/logs/%x-%j.out"
    cmd = _command(script)
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--mpi=pmix"]
    assert cmd[cmd.index("stage"):cmd.index("stage") + 4] == ["stage", "train_dpo", "--iteration", "1"]
    assert cmd[cmd.index("--config") + 1] == "/scratch/runs/r70/config.yaml"
    assert f"cd {REPO}" in script


def test_sampling_is_an_array_plus_a_gather_job_and_overrides_reach_sbatch(tmp_path):
    # the Megatron engine: with TensorRT-LLM an array task's nodes follow from its replica's GPUs
    cfg = _cfg("llama2_70b", f"model.path={tmp_path}", "executor.slurm.partition=batch", "executor.slurm.account=proj7",
               "executor.slurm.array_tasks=16", "executor.slurm.array_nodes=2", "generation.engine=megatron",
               "executor.slurm.extra_sbatch=['--exclusive']")
    spec = find_stage(plan(cfg), "sample_responses", 2)
    array, gather = render_script(cfg, spec, "array"), render_script(cfg, spec, "gather")
    a, g = _sbatch(array), _sbatch(gather)
    assert (a["array"], a["nodes"], a["partition"], a["account"]) == ("0-15", "2", "batch", "proj7")
    assert "exclusive" in a and a["output"].endswith("%x-%A_%a.out")
    assert "--array" in _command(array) and "--gather-only" in _command(gather)
    # the gather job only concatenates shards: one task, no GPUs
    assert "array" not in g and (g["nodes"], g["ntasks-per-node"]) == ("1", "1") and "gpus-per-node" not in g


def test_cpu_cluster_and_container_settings():
    cfg = _cfg("tiny", "executor.slurm.gpus_per_node=0", "executor.slurm.mpi=none",
               "executor.slurm.container_image=nvcr.io/nvidia/pytorch:24.05-py3",
               "executor.slurm.container_mounts=/lustre:/lustre", "executor.slurm.python=python",
               "executor.slurm.setup=['module load openmpi']")
    spec = find_stage(plan(cfg), "build_pairs", 1)
    script = render_script(cfg, spec)
    assert job_shape(cfg, spec, "stage") == {"nodes": 1, "ntasks_per_node": 1, "gpus_per_node": 0}
    cmd = _command(script)
    assert "--mpi=none" not in " ".join(cmd) and not any(c.startswith("--mpi") for c in cmd)
    assert "--container-image=nvcr.io/nvidia/pytorch:24.05-py3" in cmd and "--container-mounts=/lustre:/lustre" in cmd
    assert cmd[cmd.index("-m") - 1] == "python"
    assert script.index("module load openmpi") < script.index("srun ")


def test_submitting_up_to_an_iteration_stops_after_its_evaluation():
    cfg = _cfg("tiny", "pipeline.iterations=3")
    names = [(s.name, s.iteration) for s in stages_to_submit(cfg, 1)]
    assert names[-3:] == [("train_dpo", 1), ("evaluate", 2), ("report", 0)]
    assert ("generate_prompts", 2) not in names
    assert len(stages_to_submit(cfg, None)) == len(plan(cfg))


@pytest.mark.parametrize("bad, key", [
    ("executor.slurm.time=4 hours", "executor.slurm.time"),
    ("executor.slurm.array_tasks=0", "executor.slurm.array_tasks"),
    ("executor.slurm.extra_sbatch=['exclusive']", "executor.slurm.extra_sbatch"),
])
def test_bad_slurm_settings_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg("tiny", bad)


def test_array_tasks_times_ranks_number_the_workers():
    inner = Workers(rank=1, size=2, name="torch")
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    w = _within_array(inner, env)
    assert (w.rank, w.size, w.gathers) == (2 * 2 + 1, 6, False)
    assert [i for i in range(12) if w.owns(i)] == [5, 11]
    with pytest.raises(ConfigError, match="not a task of a Slurm job array"):
        _within_array(inner, {})


def test_shard_comm_auto_follows_the_launcher():
    cfg = _cfg("tiny")
    assert (shard_comm(cfg, "mpi"), shard_comm(cfg, "slurm"), shard_comm(cfg, "torchrun")) == ("mpi", "torch", "torch")
    assert shard_comm(_cfg("tiny", "executor.shard_comm=mpi"), "slurm") == "mpi"
