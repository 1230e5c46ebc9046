"""Distributed start-up: torchrun or srun environment -> torch.distributed -> Megatron TP/PP/DP.

One place decides the backend (NCCL with CUDA, gloo without), reads the launcher's environment
(torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR, or Slurm's SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID with the master derived from SLURM_JOB_NODELIST) and sets up megatron.core's
parallel state from the config.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from megatron_selfreward.config import Config, ConfigError, check_batch_layout
from megatron_selfreward.hostlist import expand_nodelist
from megatron_selfreward.megatron import compat, cpu_compat


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm", "mpi" or "single"


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "OMPI_COMM_WORLD_SIZE" in env:
        # mpirun (Open MPI), also inside a Slurm allocation, where the SLURM_* task variables
        # describe mpirun's daemons, not these ranks. MASTER_ADDR/PORT, when absent, are agreed
        # over MPI by `mpi_rendezvous`.
        return DistEnv(
            rank=int(env["OMPI_COMM_WORLD_RANK"]),
            world_size=int(env["OMPI_COMM_WORLD_SIZE"]),
            local_rank=int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", ""),
            master_port=int(env.get("MASTER_PORT", "0")),
            launcher="mpi",
        )
    # Only inside a job step (srun) do SLURM_PROCID/SLURM_NTASKS name this process: a batch
    # script also sees SLURM_NTASKS (the allocation's) and SLURM_PROCID=0 but is one process.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        # A port every task of the job derives alike, so no rendezvous is needed to agree on it.
        default_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def mpi_rendezvous(env: DistEnv) -> DistEnv:
    """Rank 0's host name and a free port on it, broadcast over MPI (mpi4py) to every rank."""
    import socket

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    address = None
    if comm.Get_rank() == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            address = (socket.gethostname() if comm.Get_size() > 1 else "127.0.0.1", sock.getsockname()[1])
    host, port = comm.bcast(address, root=0)
    return DistEnv(env.rank, env.world_size, env.local_rank, env.master_addr or host,
                   env.master_port or port, env.launcher)


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def start_process_group(env: DistEnv, timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> None:
    """torch.distributed for the launcher's processes; `timeout` bounds every collective."""
    import torch.distributed as dist

    if env.launcher == "single":
        # No launcher: an in-process store, nothing listening on a port.
        dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    if env.launcher == "mpi" and not (env.master_addr and env.master_port):
        env = mpi_rendezvous(env)
    if env.launcher in ("slurm", "mpi"):
        # env:// reads the master from these (rank and world size are passed below); under
        # torchrun they are set already and connect to torchrun's own store. RANK/WORLD_SIZE
        # stay unset so that read_dist_env keeps naming the real launcher.
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                          LOCAL_RANK=str(env.local_rank))
    dist.init_process_group(backend(), init_method="env://", rank=env.rank,
                            world_size=env.world_size, timeout=timeout)


def process_rank() -> int:
    """This process's global rank: 0 without a torch.distributed world."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def select_cuda_device(local_rank: int) -> int | None:
    """This process's GPU: `local_rank` modulo the GPUs it sees. With one task per GPU and Slurm's
    GPU binding (`--gpus-per-task`, `--gpu-bind`), each task sees only its own GPU as device 0
    while its local rank runs up to the tasks per node; with all GPUs visible it is the local rank."""
    if not torch.cuda.is_available():
        return None
    device = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(device)
    return device


def init_distributed(cfg: Config, environ: Mapping[str, str] | None = None,
                     timeout: datetime.timedelta = datetime.timedelta(minutes=30),
                     training: bool = True) -> DistEnv:
    """Start torch.distributed and megatron's TP/PP/DP groups as the config says; `timeout`
    bounds every collective of a process group started here. `training=False` (a generation
    world, `policy.generation_config`): the SFT/DPO batch sizes need not divide over its DP."""
    compat.require_megatron_core()
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.apply()
    env = read_dist_env(environ)
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if p.world_size and p.world_size != env.world_size:
        raise ConfigError(
            f"config key 'parallel.world_size': set to {p.world_size} but the launcher ({env.launcher}) "
            f"started {env.world_size} processes; set it to 0 to follow the launcher"
        )
    if env.world_size % model_parallel:
        raise ConfigError(
            f"config key 'parallel.tensor_model_parallel_size': world size {env.world_size} is not "
            f"divisible by TP x PP = {model_parallel}"
        )
    if training:
        check_batch_layout(cfg, env.world_size)
    select_cuda_device(env.local_rank)
    if not dist.is_initialized():
        start_process_group(env, timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.pipeline.seed)
    return env


def destroy_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def serial_intra_op() -> Iterator[None]:
    """One intra-op thread for the duration (the count is restored after): for distributed
    checkpoint saves and loads, and any other collective that moves large tensors.

    gloo runs a collective's tensor copies on its own worker thread. With several intra-op
    threads, OpenMP gives that thread a team of its own, and the process keeps the extra worker
    for good. Measured on 2 cores, in one process after one checkpoint load or save: a
    [16, 576] x [576, 1536] bf16 GEMM 69 -> 145 us, a SmolLM2 decode step 23 -> 37 ms, every
    op until the process exits; another process on the same machine is unaffected. With one
    intra-op thread the copies run inline and no extra worker appears.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def single_process_world(seed: int = 1234, backend: str = "gloo") -> Iterator[None]:
    """A 1-rank world (gloo, or "nccl" on GPU 0) with megatron's parallel state, for building
    models in-process.

    Reuses an existing process group (and leaves it) if the caller already has one.
    """
    compat.require_megatron_core()
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.apply()
    if parallel_state.model_parallel_is_initialized():
        yield
        return
    created = not dist.is_initialized()
    if created:
        extra = {}
        if backend == "nccl":
            torch.cuda.set_device(0)
            extra["device_id"] = torch.device("cuda", 0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **extra)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
