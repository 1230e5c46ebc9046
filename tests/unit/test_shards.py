"""Sharded stages: shard files, reuse on rerun, a changed fingerprint discards old shards, and
several workers (threads standing in for ranks / array tasks) split the shards and gather."""

from __future__ import annotations

import threading

import pytest

from megatron_selfreward.errors import StageError
from megatron_selfreward.io import JsonlError, Records, read_records, write_jsonl
from megatron_selfreward.records import Prompt
from megatron_selfreward.stages.shards import GATHER_ONLY, Workers, clear_shards, run_sharded, shard_dir, worker_stats


def _prompts(items):
    return [Prompt(prompt_id=f"p{i}", text=f"text {i}") for i in items]


def _shard_files(out):
    return sorted(p.name for p in shard_dir(out).glob("*/shard_*"))


def test_shards_are_written_reused_and_concatenated_in_order(tmp_path):
    out = tmp_path / "iter1" / "responses.jsonl"
    calls = []

    def process(shard):
        calls.append(list(shard))
        return _prompts(shard)

    records, reused = run_sharded(list(range(7)), 3, out, {"a": 1}, process, Prompt)
    assert calls == [[0, 1, 2], [3, 4, 5], [6]] and reused == 0
    assert [p.prompt_id for p in read_records(out, Prompt)] == [f"p{i}" for i in range(7)]
    assert _shard_files(out) == ["shard_00000.jsonl", "shard_00001.jsonl", "shard_00002.jsonl"]
    next(shard_dir(out).glob("*/shard_00001.jsonl")).unlink()  # as if killed while computing shard 1
    calls.clear()
    records2, reused = run_sharded(list(range(7)), 3, out, {"a": 1}, process, Prompt)
    assert calls == [[3, 4, 5]] and reused == 2 and records2 == records
    calls.clear()
    run_sharded(list(range(7)), 3, out, {"a": 2}, process, Prompt)  # other inputs: start over
    assert len(calls) == 3
    assert len([d for d in shard_dir(out).iterdir() if d.is_dir()]) == 1  # the old work is gone
    clear_shards(out)
    assert not shard_dir(out).exists()


def test_empty_input_writes_an_empty_output(tmp_path):
    out = tmp_path / "judgements.jsonl"
    records, _ = run_sharded([], 4, out, {}, lambda shard: [], Prompt)
    assert records == [] and out.read_text() == ""


def test_workers_split_the_shards_and_the_gatherer_waits_for_all(tmp_path):
    out = tmp_path / "responses.jsonl"
    barrier = threading.Barrier(3)
    computed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    results: dict[int, object] = {}

    def worker(rank: int) -> None:
        def process(shard):
            computed[rank].extend(shard)
            return _prompts(shard)

        group = Workers(rank=rank, size=3, gathers=rank == 0, barrier=barrier.wait, name="threads")
        results[rank] = run_sharded(list(range(10)), 2, out, {"a": 1}, process, Prompt, workers=group,
                                    stats=lambda: {"decode_tokens": 10 * (rank + 1)})

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # shard i (items 2i, 2i+1) belongs to worker i % 3
    assert computed == {0: [0, 1, 6, 7], 1: [2, 3, 8, 9], 2: [4, 5]}
    records, reused = results[0]
    assert [p.prompt_id for p in records] == [f"p{i}" for i in range(10)] and reused == 0
    assert results[1] == (None, 0) and results[2] == (None, 0)
    stats = sorted((w["worker"], w["shards_computed"], w["stats"]["decode_tokens"]) for w in worker_stats(out))
    assert stats == [(0, 2, 10), (1, 2, 20), (2, 1, 30)]


def test_array_tasks_leave_gathering_to_a_plain_run_that_reuses_every_shard(tmp_path):
    out = tmp_path / "judgements.jsonl"
    calls = []

    def process(shard):
        calls.append(list(shard))
        return _prompts(shard)

    for task in (1, 0):  # array tasks finish in any order and do not gather
        got = run_sharded(list(range(5)), 2, out, {"b": 1}, process, Prompt,
                          workers=Workers(rank=task, size=2, gathers=False, name="array"))
        assert got[0] is None and not out.exists()
    assert sorted(calls) == [[0, 1], [2, 3], [4]]
    calls.clear()
    records, reused = run_sharded(list(range(5)), 2, out, {"b": 1}, process, Prompt)
    assert calls == [] and reused == 3 and len(records) == 5


def test_a_gatherer_refuses_to_assemble_when_a_worker_left_shards_missing(tmp_path):
    out = tmp_path / "responses.jsonl"
    # worker 0 of 2 gathers though worker 1 never ran: its shard 1 is missing
    with pytest.raises(StageError, match="1 of 3 shards are missing.*first: 1.*Rerun the stage"):
        run_sharded(list(range(3)), 1, out, {"c": 1}, _prompts, Prompt,
                    workers=Workers(rank=0, size=2, gathers=True, name="broken"))
    assert not out.exists()


def test_a_gather_job_counts_as_reused_only_the_shards_no_array_task_computed(tmp_path):
    out = tmp_path / "responses.jsonl"
    items, fp = list(range(3)), {"d": 1}

    def crash_after_first(shard):
        if shard != [0]:
            raise RuntimeError("killed")
        return _prompts(shard)

    task0 = Workers(rank=0, size=2, gathers=False, name="array")
    with pytest.raises(RuntimeError):  # task 0 wrote shard 0, then died before shard 2
        run_sharded(items, 1, out, fp, crash_after_first, Prompt, workers=task0)
    for task in (0, 1):  # the resubmitted array: task 0 computes shard 2, task 1 shard 1
        run_sharded(items, 1, out, fp, _prompts, Prompt,
                    workers=Workers(rank=task, size=2, gathers=False, name="array"))
    records, reused = run_sharded(items, 1, out, fp, _prompts, Prompt, workers=GATHER_ONLY)
    assert [p.prompt_id for p in records] == ["p0", "p1", "p2"] and reused == 1


def test_gathering_streams_the_shards_into_what_write_jsonl_would_write(tmp_path):
    out = tmp_path / "iter1" / "responses.jsonl"
    records, _ = run_sharded(list(range(11)), 4, out, {"e": 1}, _prompts, Prompt)
    assert isinstance(records, Records) and len(records) == 11  # a view of the file, not a list
    write_jsonl(tmp_path / "reference.jsonl", _prompts(range(11)))
    assert out.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()


def test_a_corrupt_shard_is_named_with_its_line_and_nothing_is_gathered(tmp_path):
    out = tmp_path / "judgements.jsonl"
    run_sharded(list(range(4)), 2, out, {"f": 1}, _prompts, Prompt, workers=Workers(gathers=False))
    shard = next(shard_dir(out).glob("*/shard_00001.jsonl"))
    shard.write_text(shard.read_text().replace('"p3"', '"p3'), encoding="utf-8")
    with pytest.raises(JsonlError, match=rf"^{shard} line 2: invalid JSON"):
        run_sharded(list(range(4)), 2, out, {"f": 1}, _prompts, Prompt)
    assert not out.exists()
