"""Distributed start-up: launcher environments and the errors for impossible layouts."""

from __future__ import annotations

import pytest
import torch

from megatron_selfreward.config import ConfigError, load_config
from megatron_selfreward.megatron.parallel import expand_nodelist, init_distributed, read_dist_env


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("localhost", ["localhost"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[9-11],b1", ["a9", "a10", "a11", "b1"]),
        ("rack1-n[008-010]", ["rack1-n008", "rack1-n009", "rack1-n010"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_torchrun_environment():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3, 8, 1, "node7", 29400)
    assert env.launcher == "torchrun"


def test_slurm_environment_derives_master_from_nodelist_and_port_from_job():
    env = read_dist_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (9, 16, 1, "gpu12")
    assert env.master_port == 20000 + 4242 % 20000
    assert env.launcher == "slurm"


def test_a_batch_script_is_one_process_though_it_sees_the_allocations_task_count():
    # sbatch -n 2: the batch step sees SLURM_NTASKS=2 and SLURM_PROCID=0 but no SLURM_STEP_ID.
    env = read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
                         "SLURM_JOB_ID": "7"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_mpirun_ranks_win_over_the_slurm_variables_of_its_daemons():
    env = read_dist_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                         "SLURM_STEP_ID": "0", "MASTER_ADDR": "n1", "MASTER_PORT": "2222"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "mpi")
    assert (env.master_addr, env.master_port) == ("n1", 2222)


def test_no_launcher_is_a_single_process():
    env = read_dist_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_world_not_divisible_by_model_parallel_is_an_error_naming_the_key():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size"):
        init_distributed(cfg, environ={"RANK": "0", "WORLD_SIZE": "3"})


def test_world_size_in_config_must_match_launcher():
    cfg = load_config(None, ["parallel.world_size=4"])
    with pytest.raises(ConfigError, match="parallel.world_size"):
        init_distributed(cfg, environ={"RANK": "0", "WORLD_SIZE": "2"})


def test_batch_not_divisible_by_data_parallel_is_an_error():
    cfg = load_config(None, ["sft.global_batch_size=6", "sft.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="sft.global_batch_size"):
        init_distributed(cfg, environ={"RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("visible, local_rank, want", [(8, 5, 5), (1, 5, 0), (4, 6, 2)])
def test_each_task_takes_a_gpu_it_can_see(monkeypatch, visible, local_rank, want):
    """Slurm's GPU binding leaves each task one visible GPU, while local ranks go up to the
    tasks per node: set_device(local_rank) would name a device that does not exist there."""
    from megatron_selfreward.megatron.parallel import select_cuda_device

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert select_cuda_device(local_rank) == want and chosen == [want]
