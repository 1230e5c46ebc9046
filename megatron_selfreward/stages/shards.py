"""Resumable sharded stages: work in fixed shards, each written atomically as it completes.

`run_sharded` cuts a stage's input list into shards of `shard_size` items; shard i's records go
to `<out stem>.shards/<work id>/shard_0000i.jsonl` by atomic rename the moment it is done. A
rerun after a crash (or kill -9) reads the finished shards back and computes only the missing
ones; the final output is the shards concatenated in input order. Results cannot depend on where
the interruption happened because the shard boundaries are a function of the input alone and
every generation request carries its own seed (the engine derives it from the request id).

The work id is a hash of the fingerprint and shard size, so shards written for other inputs are
never reused, and several workers can open the directory at once without racing to clear it.

Several workers can share one stage (`Workers`): data-parallel ranks of a torchrun/srun job,
MPI ranks, or the tasks of a Slurm job array. Worker r of n computes the missing shards i with
i % n == r; each writes its engine statistics beside the shards. The gathering worker waits at
the group's barrier, then concatenates every shard; array tasks do not gather (a plain run of
the stage does that afterwards, reusing every shard). `clear_shards` removes the directory once
the stage's manifest is written.

Gathering streams: the shards are joined line by line into the output (each line checked as a
record on the way) and the stage gets a `Records` view of the output rather than a list, so
memory does not grow with the number of records.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from megatron_selfreward.errors import StageError
from megatron_selfreward.io import Records, atomic_write_json, concat_jsonl, write_jsonl
from megatron_selfreward.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")

META = "meta.json"


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Workers:
    """Which shards this process computes, and whether it assembles the output."""

    rank: int = 0
    size: int = 1
    writes: bool = True  # False on ranks that compute a copy (tensor-parallel ranks > 0)
    gathers: bool = True  # waits at `barrier`, then concatenates every shard
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)
    name: str = "single"  # how the group was formed, for manifests and logs
    computes: bool = True  # False: only gather shards other processes wrote
    # Loading a Megatron checkpoint is a collective over torch.distributed: every rank of such a
    # group loads the model, shards or not. Other groups load it only when a shard needs it.
    collective_load: bool = False

    def owns(self, index: int) -> bool:
        return self.computes and index % self.size == self.rank


SINGLE = Workers()
GATHER_ONLY = Workers(computes=False, name="gather")


def shard_dir(out: Path) -> Path:
    return out.parent / f"{out.name.split('.')[0]}.shards"


def work_dir(out: Path, meta: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return shard_dir(out) / digest


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.jsonl"


def _open_shards(out: Path, meta: dict[str, Any]) -> Path:
    """This work's shard directory; directories left by other work are removed."""
    directory = work_dir(out, meta)
    if shard_dir(out).is_dir():
        for other in shard_dir(out).iterdir():
            if other != directory and other.is_dir() and (other / META).is_file():
                shutil.rmtree(other, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / META).is_file():
        atomic_write_json(directory / META, meta)  # same content from every worker
    return directory


def _gather_shards(directory: Path, total: int, record_cls: type[R], out: Path) -> Records[R]:
    """Every shard's records, in shard order, written to `out`."""
    missing = [i for i in range(total) if not shard_path(directory, i).is_file()]
    if missing:
        raise StageError(
            f"{len(missing)} of {total} shards are missing in {directory} (first: {missing[0]}): a worker "
            "ended without writing its shards. Rerun the stage: finished shards are kept.")
    count = concat_jsonl([shard_path(directory, i) for i in range(total)], out, record_cls)
    return Records(out, record_cls, count)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def worker_stats(out: Path) -> list[dict[str, Any]]:
    """The statistics every worker of the current work wrote (see run_sharded's `stats`)."""
    # A worker's statistics are informative only: an unreadable file is left out.
    return [data for path in sorted(shard_dir(out).glob("*/worker_*.json")) if (data := _read_json(path))]


def run_sharded(items: Sequence[T], shard_size: int, out: Path, fp: dict[str, Any],
                process: Callable[[Sequence[T]], list[R]], record_cls: type[R],
                on_shard: Callable[[int, int, bool], None] | None = None,
                workers: Workers = SINGLE,
                stats: Callable[[], dict[str, Any]] | None = None,
                desc: str | None = None) -> tuple[Records[R] | None, int]:
    """All records of `items` in input order, as a streamed view of `out` (None on a worker that
    does not gather), and how many shards were already on disk.

    `process(shard_items)` returns the shard's records; `on_shard(index, total, reused)` reports
    progress on this worker's shards; `stats()` (e.g. the engine's counters) is saved per worker;
    `desc` shows a progress bar over this worker's items.
    """
    meta = {"fingerprint": fp, "shard_size": shard_size, "items": len(items)}
    meta = json.loads(json.dumps(meta, sort_keys=True, default=str))
    directory = _open_shards(out, meta)
    total = max(1, -(-len(items) // shard_size))
    started, computed = time.time(), 0
    # Before any worker of this run writes: what an earlier run left.
    done_before = {i for i in range(total) if shard_path(directory, i).is_file()}
    if workers.size > 1:
        workers.barrier()  # every worker has looked before any writes
    mine = [i for i in range(total) if workers.owns(i)]
    bar = None
    if desc is not None and workers.writes and mine:
        label = desc if workers.size == 1 else f"{desc} [worker {workers.rank + 1}/{workers.size}]"
        bar = progress_bar(sum(len(items[i * shard_size : (i + 1) * shard_size]) for i in mine), label,
                           unit="item")
    for index in mine:
        shard_items = items[index * shard_size : (index + 1) * shard_size]
        if index in done_before:
            if on_shard is not None:
                on_shard(index, total, True)
        else:
            shard = process(shard_items)
            computed += 1
            if workers.writes:
                write_jsonl(shard_path(directory, index), shard)
            if on_shard is not None:
                on_shard(index, total, False)
        if bar is not None:
            bar.update(len(shard_items))
    if bar is not None:
        bar.close()
    if workers.writes and computed:
        atomic_write_json(directory / f"worker_{workers.rank:05d}-of-{workers.size:05d}.json",
                          {"worker": workers.rank, "workers": workers.size, "group": workers.name,
                           "shards_computed": computed, "wall_time_s": round(time.time() - started, 3),
                           "stats": stats() if stats is not None else {}})
    workers.barrier()
    reused = len(done_before)
    if not workers.computes:  # a gather job: the array tasks' own files say what they computed
        computed_by = [w.get("shards_computed", 0) for w in worker_stats(out)]
        reused = max(0, total - sum(n for n in computed_by if isinstance(n, int)))
    if not workers.gathers:
        return None, reused
    return _gather_shards(directory, total, record_cls, out), reused


def clear_shards(out: Path) -> None:
    shutil.rmtree(shard_dir(out), ignore_errors=True)
