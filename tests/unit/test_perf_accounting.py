"""perf helpers: device-name peaks, the memory meter, generation figures, the profile scratch copy."""

from __future__ import annotations

import mmap
import time

import pytest
import torch

from megatron_selfreward.perf.accounting import generation_accounting, training_accounting
from megatron_selfreward.perf.flops import PEAK_BF16_FLOPS, peak_key_for_device_name
from megatron_selfreward.perf.memory import PeakMemory, process_peaks, rss_bytes
from megatron_selfreward.pipeline.profile import mirror_run_dir


@pytest.mark.parametrize("name, key", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
                                       ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA A100-SXM4-80GB", "a100"),
                                       ("NVIDIA L40S", "l40s"), ("Tesla T4", None)])
def test_device_names_map_to_datasheet_peaks(name, key):
    assert peak_key_for_device_name(name) == key
    if key:
        assert PEAK_BF16_FLOPS[key] > 1e14


def test_peak_memory_sees_an_allocation_inside_the_block():
    size = 64 * 2**20
    before = rss_bytes(include_children=True)
    with PeakMemory(interval_s=0.01) as meter:
        # Fresh anonymous pages, not malloc's: a free pool left by earlier code in this process
        # (some libraries keep freed memory mapped) could otherwise hide the allocation.
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)  # touch every page
        time.sleep(0.2)  # alive across many samples
        block.close()
    after = rss_bytes(include_children=True)
    peak = meter.result()["peak_rss_bytes"]
    # Like with like: the meter and rss_bytes both count this process plus its live children.
    assert peak - before >= 60 * 2**20
    assert peak - after >= 60 * 2**20  # the block was freed: a peak inside the block, not a level


def test_process_peaks_is_a_high_water_mark_of_this_process():
    block = torch.ones(32 * 2**20 // 4)
    block += 1
    now = rss_bytes()
    del block
    assert process_peaks()["peak_rss_bytes"] >= now - 2**20


def test_generation_accounting_derives_batch_padding_and_rates():
    rows = [{"stage": "iter1/responses", "wall_time_s": 4.0}]
    engine = {"prefill_tokens_computed": 300, "prefill_pad_tokens": 100, "decode_tokens": 120,
              "decode_row_steps": 120, "decode_steps": 20, "prefill_time_s": 1.0, "decode_time_s": 2.0,
              "prefill_saved_fraction": 0.5}
    (row,) = generation_accounting(rows, {"iter1/responses": engine})
    assert row["decode_mean_batch"] == 6.0
    assert row["prefill_pad_fraction"] == 0.25
    assert row["output_tokens_per_engine_s"] == 40.0 and row["output_tokens_per_stage_s"] == 30.0
    (bare,) = generation_accounting(rows, {})
    assert bare["decode_mean_batch"] is None and bare["engine_time_s"] is None


def test_training_accounting_without_config_says_why():
    (row,) = training_accounting([{"run": "SFT -> M1", "steps": 1, "tokens": 10.0, "tokens_per_s": 5.0}],
                                 None, None)
    assert "mfu" not in row and "config" in row["mfu_missing"]


def test_profile_scratch_copy_links_inputs_and_leaves_outputs_out(tmp_path):
    run = tmp_path / "run"
    (run / "iter1" / "responses.shards").mkdir(parents=True)
    (run / "models" / "M1").mkdir(parents=True)
    for rel in ("config.yaml", "iter1/prompts.jsonl", "iter1/prompts.manifest.json", "iter1/responses.jsonl",
                "iter1/responses.manifest.json", "models/M1/w.bin", "models/M1.manifest.json"):
        (run / rel).write_text(rel)
    (run / "profile" / "x").mkdir(parents=True)
    scratch = mirror_run_dir(run, tmp_path / "scratch", [run / "iter1" / "responses.jsonl"],
                             keep_out=run / "profile" / "x")
    assert sorted(p.name for p in (scratch / "iter1").iterdir()) == ["prompts.jsonl", "prompts.manifest.json"]
    assert (scratch / "iter1").is_dir() and not (scratch / "iter1").is_symlink()
    assert (scratch / "models").is_symlink() and (scratch / "models" / "M1" / "w.bin").read_text() == "models/M1/w.bin"
    assert not (scratch / "config.yaml").exists() and not (scratch / "profile").exists()
