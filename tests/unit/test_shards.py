"""Sharded stages: shard files, reuse on rerun, and a changed fingerprint discards old shards."""

from __future__ import annotations

from megatron_selfreward.io import read_records
from megatron_selfreward.records import Prompt
from megatron_selfreward.stages.shards import clear_shards, run_sharded, shard_dir


def _prompts(items):
    return [Prompt(prompt_id=f"p{i}", text=f"text {i}") for i in items]


def test_shards_are_written_reused_and_concatenated_in_order(tmp_path):
    out = tmp_path / "iter1" / "responses.jsonl"
    calls = []

    def process(shard):
        calls.append(list(shard))
        return _prompts(shard)

    records, reused = run_sharded(list(range(7)), 3, out, {"a": 1}, process, Prompt)
    assert calls == [[0, 1, 2], [3, 4, 5], [6]] and reused == 0
    assert [p.prompt_id for p in read_records(out, Prompt)] == [f"p{i}" for i in range(7)]
    assert sorted(p.name for p in shard_dir(out).glob("shard_*")) == [
        "shard_00000.jsonl", "shard_00001.jsonl", "shard_00002.jsonl"]
    (shard_dir(out) / "shard_00001.jsonl").unlink()  # as if killed while computing shard 1
    calls.clear()
    records2, reused = run_sharded(list(range(7)), 3, out, {"a": 1}, process, Prompt)
    assert calls == [[3, 4, 5]] and reused == 2 and records2 == records
    calls.clear()
    run_sharded(list(range(7)), 3, out, {"a": 2}, process, Prompt)  # other inputs: start over
    assert len(calls) == 3
    clear_shards(out)
    assert not shard_dir(out).exists()


def test_empty_input_writes_an_empty_output(tmp_path):
    out = tmp_path / "judgements.jsonl"
    records, _ = run_sharded([], 4, out, {}, lambda shard: [], Prompt)
    assert records == [] and out.read_text() == ""
