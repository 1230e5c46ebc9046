"""Who shares a sharded generation stage (sample_responses, judge_responses), and how.

A sharded stage run by N processes splits its shards by data-parallel worker (see
`stages/shards.py`); this module forms that group from the launcher:

- one process (no launcher): every shard, and it gathers;
- torchrun / srun (`executor.shard_comm: torch`): torch.distributed in the generation layout
  (`generation.tensor_parallel_size`, PP = 1; `policy.generation_config`), not training's: each
  replica is a TP group, replica r of n takes shards i % n == r; only TP rank 0 writes; global
  rank 0 gathers after a barrier;
- TensorRT-LLM (`generation.engine: trtllm`): a replica is one process whose LLM spans
  `generation.tensor_parallel_size` GPUs itself (started under `trtllm-llmapi-launch` on a
  cluster, where the other ranks of the launch are TensorRT-LLM's workers, not ours): one
  worker per process, and the replicas of a stage are the tasks of its Slurm job array;
- MPI (`mpirun`, or `srun --mpi=pmix` with `executor.shard_comm: mpi`): mpi4py's COMM_WORLD, one
  whole model per rank (TP = 1), no torch.distributed between ranks;
- one task of a Slurm job array (`selfreward stage ... --array`): array task a of A, times the
  ranks inside each task; array tasks never gather — the stage's plain run afterwards does,
  reusing every shard (and computing any a failed task left).

`LazyEngine` defers loading the model until a shard actually needs generating, so a gathering
run that finds every shard on disk loads nothing (except in torch.distributed groups, where
loading a checkpoint is a collective every rank must join).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator, Mapping

from megatron_selfreward.config import Config, ConfigError, generation_tp
from megatron_selfreward.policy import generation_config
from megatron_selfreward.stages.shards import GATHER_ONLY, SINGLE, Workers

# A barrier waits for the slowest worker's last shard: allow long shards on big models.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def shard_comm(cfg: Config, launcher: str) -> str:
    """'torch' or 'mpi' for this launcher; `auto` follows it (mpirun -> mpi, else torch)."""
    comm = cfg.executor.shard_comm
    if comm == "auto":
        return "mpi" if launcher == "mpi" else "torch"
    return comm


def _array_task(environ: Mapping[str, str]) -> tuple[int, int]:
    """(index, count) of this Slurm array task, counted from 0 whatever the array's range."""
    try:
        task = int(environ["SLURM_ARRAY_TASK_ID"])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(environ["SLURM_ARRAY_TASK_COUNT"])
    except (KeyError, ValueError) as err:
        raise ConfigError("--array: this process is not a task of a Slurm job array "
                          "(SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT are not set); run the stage "
                          "without --array, or submit it with sbatch --array") from err
    return task - first, count


def _within_array(inner: Workers, environ: Mapping[str, str]) -> Workers:
    index, count = _array_task(environ)
    return Workers(rank=index * inner.size + inner.rank, size=count * inner.size, writes=inner.writes,
                   gathers=False, barrier=inner.barrier, name=f"array[{count}]x{inner.name}",
                   collective_load=inner.collective_load)


def _torch_workers() -> Workers:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    return Workers(rank=ps.get_data_parallel_rank(), size=ps.get_data_parallel_world_size(),
                   writes=tp_rank == 0, gathers=dist.get_rank() == 0, barrier=dist.barrier,
                   collective_load=True,
                   name=f"torch[dp={ps.get_data_parallel_world_size()},tp={ps.get_tensor_model_parallel_world_size()}]")


def _mpi_workers(cfg: Config) -> Workers:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ConfigError("config key 'executor.shard_comm' is 'mpi' but mpi4py cannot be imported: "
                          "pip install mpi4py (with an MPI library such as Debian's openmpi-bin)") from err
    if generation_tp(cfg) != 1 and cfg.generation.engine == "megatron":
        raise ConfigError("config key 'executor.shard_comm': 'mpi' runs one whole model per rank; "
                          "with generation.tensor_parallel_size > 1 use 'torch' (torchrun or srun)")
    comm = MPI.COMM_WORLD
    return Workers(rank=comm.Get_rank(), size=comm.Get_size(), gathers=comm.Get_rank() == 0,
                   barrier=comm.Barrier, name=f"mpi[{comm.Get_size()}]")


@contextlib.contextmanager
def generation_workers(cfg: Config, array: bool = False, gather_only: bool = False,
                       environ: Mapping[str, str] | None = None) -> Iterator[Workers]:
    """The worker group of this process for a sharded stage, with the world it needs set up
    (megatron's parallel state for building the model) for the duration. `gather_only`: write
    the output from shards that array tasks wrote, computing none (an error if any is missing)."""
    from megatron_selfreward.megatron.parallel import (destroy_distributed, init_distributed, read_dist_env,
                                                       single_process_world)

    env = os.environ if environ is None else environ
    if gather_only:
        yield GATHER_ONLY
        return
    launched = read_dist_env(env)
    comm = shard_comm(cfg, launched.launcher)
    if cfg.generation.engine == "trtllm":
        # One replica per process; no torch.distributed world (TensorRT-LLM forms its own).
        if launched.rank != 0:
            raise ConfigError(
                f"config key 'generation.engine': with trtllm each replica is one process whose LLM "
                f"spans generation.tensor_parallel_size={generation_tp(cfg)} GPUs, but this is rank "
                f"{launched.rank} of {launched.world_size} ({launched.launcher}): start the stage as one "
                "process (srun ... trtllm-llmapi-launch, which runs it on rank 0 and TensorRT-LLM's "
                "workers on the others), and use a Slurm job array for more replicas")
        with single_process_world(cfg.pipeline.seed):
            yield _within_array(SINGLE, env) if array else SINGLE
        return
    if launched.world_size > 1 and comm == "torch":
        init_distributed(generation_config(cfg), env, timeout=BARRIER_TIMEOUT, training=False)
        try:
            workers = _torch_workers()
            yield _within_array(workers, env) if array else workers
        finally:
            destroy_distributed()
        return
    with single_process_world(cfg.pipeline.seed):
        workers = _mpi_workers(cfg) if launched.world_size > 1 else SINGLE
        yield _within_array(workers, env) if array else workers


class LazyEngine:
    """An engine loaded on first use: `generate` loads it; `stats`/`reset_stats` before that
    report nothing and load nothing."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._engine: Any = None

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def generate(self, requests: Any) -> Any:
        if self._engine is None:
            self._engine = self._load()
            reset = getattr(self._engine, "reset_stats", None)
            if reset is not None:
                reset()  # an engine shared with an earlier stage: count only this one's work
        return self._engine.generate(requests)

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._engine.stats) if self._engine is not None else {}

    def reset_stats(self) -> None:
        if self._engine is not None:
            reset = getattr(self._engine, "reset_stats", None)
            if reset is not None:
                reset()
