"""Resumable sharded stages: work in fixed shards, each written atomically as it completes.

`run_sharded` cuts a stage's input list into shards of `shard_size` items; shard i's records go
to `<out stem>.shards/shard_0000i.jsonl` by atomic rename the moment it is done. A rerun after a
crash (or kill -9) reads the finished shards back and computes only the missing ones; the final
output is the shards concatenated in input order. Results cannot depend on where the
interruption happened because the shard boundaries are a function of the input alone and every
generation request carries its own seed (the engine derives it from the request id).

The shard directory remembers the fingerprint and shard size it was written under; any change
discards it. `clear_shards` removes it once the stage's manifest is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from megatron_selfreward.io import atomic_write_json, read_records, write_jsonl

T = TypeVar("T")
R = TypeVar("R")

META = "meta.json"


def shard_dir(out: Path) -> Path:
    return out.parent / f"{out.name.split('.')[0]}.shards"


def shard_path(out: Path, index: int) -> Path:
    return shard_dir(out) / f"shard_{index:05d}.jsonl"


def _open_shards(out: Path, meta: dict[str, Any]) -> None:
    """Keep the shard directory only if it was written for exactly this work."""
    directory = shard_dir(out)
    try:
        same = json.loads((directory / META).read_text()) == meta
    except (FileNotFoundError, json.JSONDecodeError):
        same = False
    if not same:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        atomic_write_json(directory / META, meta)


def run_sharded(items: Sequence[T], shard_size: int, out: Path, fp: dict[str, Any],
                process: Callable[[Sequence[T]], list[R]], record_cls: type[R],
                on_shard: Callable[[int, int, bool], None] | None = None) -> tuple[list[R], int]:
    """All records of `items` in input order, and how many shards were reused from disk.

    `process(shard_items)` returns the shard's records; `on_shard(index, total, reused)` reports
    progress.
    """
    meta = {"fingerprint": fp, "shard_size": shard_size, "items": len(items)}
    meta = json.loads(json.dumps(meta, sort_keys=True, default=str))
    _open_shards(out, meta)
    total = max(1, -(-len(items) // shard_size))
    records: list[R] = []
    reused = 0
    for index in range(total):
        path = shard_path(out, index)
        was_done = path.is_file()
        if was_done:
            records.extend(read_records(path, record_cls))
            reused += 1
        else:
            shard = process(items[index * shard_size : (index + 1) * shard_size])
            write_jsonl(path, shard)
            records.extend(shard)
        if on_shard is not None:
            on_shard(index, total, was_done)
    write_jsonl(out, records)
    return records, reused


def clear_shards(out: Path) -> None:
    shutil.rmtree(shard_dir(out), ignore_errors=True)
