"""benchmarks/gpu_bench.py on CPU: arguments, the bandwidth bound by hand, the table, part isolation, the smoke mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_bench.py"
_spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules["gpu_bench"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


def test_decode_bound_by_hand_for_the_tiny_shape():
    s = bench.CPU_SHAPE
    # Per layer: Q,O 2 x 64x64 = 8192; K,V 2 x 64x32 = 4096; MLP 3 x 64x160 = 30720; 2 norms 128
    # -> 43,136; x 2 layers + output 64x512 + final norm 64 = 119,104 weights.
    assert bench.gemm_params(s) == 119_104
    # KV per token: 2 layers x (K, V) x 2 groups x 16 dims x 2 bytes = 256 B.
    assert bench.kv_bytes_per_token(s, 2) == 256
    # Batch 4, mean context 16 + 16/2 = 24: 119,104 x 2 + 4 x 24 x 256 = 262,784 B per step.
    assert bench.decode_bound_tokens_per_s(s, 4, 4.8e12) == pytest.approx(4 * 4.8e12 / 262_784)


def test_h200_shape_is_about_one_billion_parameters():
    assert 1.0e9 < bench.gemm_params(bench.GPU_SHAPE) < 1.1e9
    # Batch 1 decode is weight-bound: ~2.07 GB per token at 4.8 TB/s -> ~2,300 tokens/s.
    assert 2200 < bench.decode_bound_tokens_per_s(bench.GPU_SHAPE, 1, 4.8e12) < 2400


def test_arguments_and_dry_run(capsys):
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "## SFT step" in out and "## DPO step" in out and "| 64 |" in out and "llama-1.1b" in out
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "sft,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-steps", "1"])


def test_bandwidth_by_device_name():
    assert bench.bandwidth_for("cuda", "NVIDIA H200", None)[0] == 4.8e12
    assert bench.bandwidth_for("cuda", "NVIDIA H100 80GB HBM3", None)[0] == 3.35e12
    assert bench.bandwidth_for("cuda", "NVIDIA H100 PCIe", None)[0] == 2.0e12
    assert bench.bandwidth_for("cuda", "NVIDIA H100 80GB HBM3", 4.0) == (4.0e12, "--bandwidth-tb-s")
    value, why = bench.bandwidth_for("cuda", "NVIDIA B200", None)
    assert value is None and "--bandwidth-tb-s" in why


def test_gpu_shapes_fit_their_sequence_lengths():
    s = bench.GPU_SHAPE
    # SFT: user + assistant halves of seq_len - 64 bytes; DPO: prompt seq/4, responses seq*3/4 - 64;
    # the chat template adds ~21 byte tokens to each (measured on the tiny shape).
    assert (s.seq_len - 64) // 2 * 2 + 21 <= s.seq_len
    assert s.dpo_seq_len // 4 + (s.dpo_seq_len - s.dpo_seq_len // 4 - 64) + 21 <= s.dpo_seq_len
    assert s.global_batch % s.micro_batch == 0 and s.dpo_global_batch % s.dpo_micro_batch == 0
    assert bench.GPU_SHAPE.with_steps(2).warmup_steps == 1 and bench.GPU_SHAPE.with_steps(2).dpo_steps == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_it_fails_fast_with_what_to_do(capsys):
    assert bench.main([]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_table_renders_the_numbers():
    result = {"benchmark": "gpu_bench", "date": "d", "hardware": {"gpu": "NVIDIA H200", "torch": "t"},
              "settings": {"dtype": "bfloat16", "bandwidth_tb_s": 4.8, "shape": bench.GPU_SHAPE.__dict__},
              "results": {"sft": {"tokens_per_s": 50_000.0, "step_time_s_mean": 0.6, "attention_seq_len": 2000.0,
                                    "flops_per_token": 7.0e9, "model_flop_s": 3.5e14, "peak_flop_s": 989e12,
                                    "peak_source": "datasheet dense BF16 (h200)", "mfu": 3.5e14 / 989e12,
                                    "peak_cuda_allocated_gib": 40.0},
                          "dpo": {"pairs_per_step": 16, "tokens_per_s": 40_000.0, "step_time_s_mean": 0.5,
                                  "reference_time_s_per_step": 0.1, "attention_seq_len": 980.0,
                                  "model_flop_s": 3.0e14, "mfu": 3.0e14 / 989e12, "mfu_policy_steps": 0.32,
                                  "mfu_reference_forward": 0.25, "peak_cuda_allocated_gib": 30.0},
                          "generate": [{"batch": 64, "prompt_tokens": 128, "new_tokens": 128,
                                        "prefill_tokens_per_s": 1e5, "decode_tokens_per_s": 3000.0,
                                        "decode_bound_tokens_per_s": 60000.0, "bandwidth_fraction": 0.05}],
                          "logprobs": [{"impl": "triton", "tokens": 8192, "hidden": 2048, "vocab": 32000,
                                        "dtype": "bfloat16", "fwd_bwd_ms": 12.5, "peak_extra_gib": 0.1,
                                        "max_abs_diff_vs_reference": 1e-3}]},
              "errors": {"generate": "Traceback...\nRuntimeError: boom"}}
    table = bench.format_table(result)
    assert "| 50,000 | 0.600 | 2000 | 7.00 | 350.0 | 989.0 | 35.4% | 40.0 |" in table
    assert "| 16 | 40,000 | 0.500 | 0.100 | 980 | 300.0 | 30.3% | 32.0% | 25.0% | 30.0 |" in table
    assert "| 64 | 128+128 | 100,000 | 3,000 | 60,000 | 5.0% |" in table
    assert "| triton | 8192 x 2048 x 32000 | bfloat16 | 12.50 | 0.10 | 1.00e-03 |" in table
    assert "**generate failed**: RuntimeError: boom" in table


def _fake_part(args, part, part_json, work_dir):
    """A part that hangs (logprobs) or writes a result at once (the others)."""
    if part == "logprobs":
        return ["bash", "-c", "echo computing; sleep 60 & sleep 60"]
    result = {"results": {part: [{"batch": 1}]}, "errors": {}, "hardware": {"gpu": "NVIDIA H200"},
              "settings": {"bandwidth_tb_s": 4.8, "bandwidth_source": "datasheet HBM bandwidth (h200)"}}
    return [sys.executable, "-c", f"import json, sys; json.dump({result!r}, open(sys.argv[1], 'w'))", str(part_json)]


def test_isolated_parts_a_hanging_part_is_killed_and_the_others_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "part_command", _fake_part)
    monkeypatch.setattr(bench, "MIN_PART_S", 1)
    started = time.monotonic()
    rc = bench.main(["--isolate", "--parts", "generate,logprobs", "--time-budget-s", "4", "--out-dir", str(tmp_path)])
    assert rc == 1 and time.monotonic() - started < 30
    result = json.loads((tmp_path / "gpu_h200.json").read_text())
    assert result["results"]["generate"] == [{"batch": 1}] and list(result["timings_s"]) == ["logprobs", "generate"]
    assert result["errors"]["logprobs"].splitlines()[0] == "computing"
    assert "TimeoutError: part 'logprobs' killed after" in result["errors"]["logprobs"]
    assert result["settings"]["bandwidth_tb_s"] == 4.8
    assert "**logprobs failed**: TimeoutError" in (tmp_path / "gpu_h200.md").read_text()


@pytest.mark.slow
def test_cpu_smoke_mode_runs_every_part(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--repeats", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["hardware"]["torch"] == torch.__version__
    sft = result["results"]["sft"]
    assert sft["mfu"] == pytest.approx(sft["tokens_per_s"] * sft["flops_per_token"] / sft["peak_flop_s"])
    assert result["results"]["dpo"]["steps_measured"] == 2
    assert [g["batch"] for g in result["results"]["generate"]] == [1, 4]
    assert all(g["decode_tokens"] == g["batch"] * 16 for g in result["results"]["generate"])
    impls = {r["impl"] for r in result["results"]["logprobs"]}
    assert {"reference (fp32 [T, V] logits)", "torch chunked"} <= impls
    assert all(r["max_abs_diff_vs_reference"] < 1e-4 for r in result["results"]["logprobs"])
    assert "## Log-prob kernel" in out.with_suffix(".md").read_text()
