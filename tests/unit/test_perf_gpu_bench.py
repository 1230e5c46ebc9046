"""benchmarks/gpu_bench.py on CPU: arguments, the bandwidth bound by hand, the table, the smoke mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

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
    assert "## Training" in out and "| 64 |" in out and "llama-1.1b" in out
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "train,nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_it_fails_fast_with_what_to_do(capsys):
    assert bench.main([]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_table_renders_the_numbers():
    result = {"benchmark": "gpu_bench", "date": "d", "hardware": {"gpu": "NVIDIA H200", "torch": "t"},
              "settings": {"dtype": "bfloat16", "bandwidth_tb_s": 4.8, "shape": bench.GPU_SHAPE.__dict__},
              "results": {"train": {"tokens_per_s": 50_000.0, "step_time_s_mean": 0.6, "attention_seq_len": 2000.0,
                                    "flops_per_token": 7.0e9, "model_flop_s": 3.5e14, "peak_flop_s": 989e12,
                                    "peak_source": "datasheet dense BF16 (h200)", "mfu": 3.5e14 / 989e12,
                                    "peak_cuda_allocated_gib": 40.0},
                          "generate": [{"batch": 64, "prompt_tokens": 128, "new_tokens": 128,
                                        "prefill_tokens_per_s": 1e5, "decode_tokens_per_s": 3000.0,
                                        "decode_bound_tokens_per_s": 60000.0, "bandwidth_fraction": 0.05}],
                          "logprobs": [{"impl": "triton", "tokens": 8192, "hidden": 2048, "vocab": 32000,
                                        "dtype": "bfloat16", "fwd_bwd_ms": 12.5, "peak_extra_gib": 0.1,
                                        "max_abs_diff_vs_reference": 1e-3}]},
              "errors": {"generate": "Traceback...\nRuntimeError: boom"}}
    table = bench.format_table(result)
    assert "| 50,000 | 0.600 | 2000 | 7.00 | 350.0 | 989.0 | 35.4% | 40.0 |" in table
    assert "| 64 | 128+128 | 100,000 | 3,000 | 60,000 | 5.0% |" in table
    assert "| triton | 8192 x 2048 x 32000 | bfloat16 | 12.50 | 0.10 | 1.00e-03 |" in table
    assert "**generate failed**: RuntimeError: boom" in table


@pytest.mark.slow
def test_cpu_smoke_mode_runs_every_part(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--repeats", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["hardware"]["torch"] == torch.__version__
    train = result["results"]["train"]
    assert train["mfu"] == pytest.approx(train["tokens_per_s"] * train["flops_per_token"] / train["peak_flop_s"])
    assert [g["batch"] for g in result["results"]["generate"]] == [1, 4]
    assert all(g["decode_tokens"] == g["batch"] * 16 for g in result["results"]["generate"])
    impls = {r["impl"] for r in result["results"]["logprobs"]}
    assert {"reference (fp32 [T, V] logits)", "torch chunked"} <= impls
    assert all(r["max_abs_diff_vs_reference"] < 1e-4 for r in result["results"]["logprobs"])
    assert "## Log-prob kernel" in out.with_suffix(".md").read_text()
