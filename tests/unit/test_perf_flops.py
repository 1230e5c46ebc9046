"""FLOPs per token and MFU: the Megatron-LM formula pinned against hand derivations."""

from __future__ import annotations

import math

import pytest

from megatron_selfreward.config import load_config
from megatron_selfreward.perf.flops import (
    PEAK_BF16_FLOPS,
    LlamaShape,
    config_flops_per_token,
    measure_matmul_flops,
    mfu,
    peak_flops,
    training_flops_per_token,
)
from tests.conftest import CONFIGS

LLAMA2_70B = LlamaShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                        num_attention_heads=64, num_query_groups=8, vocab_size=32000)
LLAMA2_7B = LlamaShape(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                       num_attention_heads=32, num_query_groups=32, vocab_size=32000)


def test_llama2_70b_at_4096_unhalved():
    # By hand, as 6 N + 12 L s h (N = GEMM parameters; embedding lookup and norms do no GEMM):
    #   per layer: Q, O 2 x 8192^2 = 134,217,728; K, V 2 x 8192 x 1024 (8 groups x 128) = 16,777,216;
    #              MLP 3 x 8192 x 28672 = 704,643,072          -> 855,638,016
    #   80 layers = 68,451,041,280; output layer 8192 x 32000 = 262,144,000 -> N = 68,713,185,280
    #   6 N                    = 412,279,111,680
    #   12 L s h = 12 x 80 x 4096 x 8192 = 32,212,254,720 (QK^T and PV, fwd + 2x bwd)
    #   total                  = 444,491,366,400  (= 444.49 GFLOP/token)
    # Megatron's grouping gives the same: 12 L h^2 (1.625 + 5.25 + 0.0244140625) = 64,424,509,440
    # x 6.8994140625.
    flops = training_flops_per_token(LLAMA2_70B, 4096, causal_halved=False)
    assert flops == 444_491_366_400
    assert math.isclose(flops, 444.5e9, rel_tol=5e-4)


def test_llama2_70b_causal_halved_removes_half_the_core_attention():
    # 444,491,366,400 - 6 L s h (= 16,106,127,360) = 428,385,239,040
    assert training_flops_per_token(LLAMA2_70B, 4096, causal_halved=True) == 428_385_239_040


def test_llama2_7b_matches_6n_plus_attention():
    # By hand: per layer 4 x 4096^2 (MHA: 32 groups = 32 heads) = 67,108,864
    #          + MLP 3 x 4096 x 11008 = 135,266,304               -> 202,375,168
    #   32 layers = 6,476,005,376; output layer 4096 x 32000 = 131,072,000 -> N = 6,607,077,376
    #   6 N = 39,642,464,256; 12 L s h = 12 x 32 x 4096 x 4096 = 6,442,450,944
    #   total = 46,084,915,200 unhalved; halved: - 3,221,225,472 = 42,863,689,728
    n_gemm = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    assert n_gemm == 6_607_077_376
    unhalved = training_flops_per_token(LLAMA2_7B, 4096, causal_halved=False)
    assert unhalved == 6 * n_gemm + 12 * 32 * 4096 * 4096 == 46_084_915_200
    halved = training_flops_per_token(LLAMA2_7B, 4096, causal_halved=True)
    assert halved == 6 * n_gemm + 6 * 32 * 4096 * 4096 == 42_863_689_728


def test_config_presets_use_their_shape_and_sequence():
    cfg = load_config(CONFIGS / "llama2_70b.yaml")
    assert config_flops_per_token(cfg, causal_halved=False) == 444_491_366_400
    assert config_flops_per_token(cfg, causal_halved=False, seq_len=2048) == (
        training_flops_per_token(LLAMA2_70B, 2048, causal_halved=False))


def test_mfu_and_peaks():
    assert PEAK_BF16_FLOPS["h100-sxm"] == PEAK_BF16_FLOPS["h200"] == 989e12
    assert PEAK_BF16_FLOPS["a100"] == 312e12
    # 32 H100s at 989 TFLOP/s; 30,000 tokens/s x 444.49 GFLOP = 13.33 PFLOP/s -> 42.1 %
    value = mfu(30_000, 444_491_366_400, 32 * peak_flops("H100-SXM"))
    assert math.isclose(value, 30_000 * 444_491_366_400 / (32 * 989e12))
    assert 0.42 < value < 0.422
    with pytest.raises(ValueError, match="measure"):
        peak_flops("cpu")
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_measured_cpu_peak_is_positive():
    assert measure_matmul_flops(n=64, repeats=2) > 0
