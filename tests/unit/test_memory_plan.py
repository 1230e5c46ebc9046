"""The memory planner against hand-computed figures for Llama 2 70B, and the `plan` command."""

from __future__ import annotations

import pytest

from megatron_selfreward.cli import main
from megatron_selfreward.config import load_config
from megatron_selfreward.perf.memory_plan import (
    GIB,
    Layout,
    estimate,
    kv_cache_bytes,
    layer_activation_bytes,
    model_state_bytes_per_param,
    plan_layouts,
    stage_activation_bytes,
    stage_parameters,
    valid_layouts,
)
from tests.conftest import CONFIGS

# Hand figures, Llama 2 70B (h 8192, f 28672, 64 heads, 8 KV groups of 128, 80 layers, V 32000):
#   per layer: Q, O 2 x 8192^2 = 134,217,728; K, V 2 x 8192 x 1024 = 16,777,216;
#              MLP 3 x 8192 x 28672 = 704,643,072 -> 855,638,016 GEMM; norms 2 x 8192
#   TP=8: 855,638,016 / 8 = 106,954,752 + 16,384 (norms are replicated) = 106,971,136
#   PP=4: 20 layers = 2,139,422,720; + embedding 32000 x 8192 / 8 = 32,768,000 on stage 0,
#         + output layer 32,768,000 + final norm 8,192 on stage 3
STAGE0_PARAMS = 2_172_190_720
STAGE3_PARAMS = 2_172_198_912
# Activations, SFT (1 x 4096 tokens), flash attention, dropout 0.1, TP=8 with SP:
#   s*h = 4096 x 8192 = 33,554,432 bytes per unit
#   per layer: R = 4 + 4 + 2 = 10, S = 4 + 4/8 + 6 x 3.5 = 25.5 -> 35.5 s*h / 8 = 148,897,792
#   stage 0, 1F1B: 16 micro-batches per step >= PP, so 4 in flight x 20 layers
#     = 11,911,823,360 + embedding-dropout masks 4 x s*h / 8 = 16,777,216 -> 11,928,600,576
#   full recompute: layer inputs 4 x 20 x 2 s*h / 8 = 671,088,640 + masks 16,777,216
#     + one layer being recomputed 148,897,792 -> 836,763,648
LAYER_BYTES = 148_897_792
STAGE0_ACTS = 11_928_600_576
STAGE0_ACTS_RECOMPUTE = 836_763_648


@pytest.fixture(scope="module")
def cfg70b():
    return load_config(CONFIGS / "llama2_70b.yaml")


def test_parameters_per_stage_add_up_to_the_published_count(cfg70b):
    assert stage_parameters(cfg70b, 8, 4, 0) == STAGE0_PARAMS
    assert stage_parameters(cfg70b, 8, 4, 3) == STAGE3_PARAMS
    # One GPU holding everything = the released checkpoint's 68,976,648,192 parameters.
    assert stage_parameters(cfg70b, 1, 1, 0) == 68_976_648_192


def test_bf16_distributed_optimizer_bytes_per_param(cfg70b):
    # Megatron's table: bf16 params with fp32 grads = 6 + 12/DP bytes with the distributed optimizer.
    assert model_state_bytes_per_param(cfg70b, Layout(8, 4, 1, True, True)) == (2, 4, 12)
    assert model_state_bytes_per_param(cfg70b, Layout(8, 4, 4, True, True)) == (2, 4, 3)
    assert model_state_bytes_per_param(cfg70b, Layout(8, 4, 4, True, False)) == (2, 4, 12)


def test_activation_formula(cfg70b):
    layout = Layout(8, 4, 1, True, True)
    assert layer_activation_bytes(cfg70b, layout, 4096, 1) == LAYER_BYTES
    assert stage_activation_bytes(cfg70b, layout, 0, phase="sft") == STAGE0_ACTS
    assert stage_activation_bytes(cfg70b, layout, 0, phase="sft", recompute=True) == STAGE0_ACTS_RECOMPUTE
    # A DPO micro-batch is chosen + rejected: twice the tokens, twice the activations.
    assert stage_activation_bytes(cfg70b, layout, 0, phase="dpo") == 2 * STAGE0_ACTS
    # Without SP the replicated 10 s*h stay whole: (10 + 25.5 / 8) s*h = 442,499,072 per layer.
    assert layer_activation_bytes(cfg70b, Layout(8, 4, 1, False, True), 4096, 1) == 442_499_072
    # Unfused attention adds 5 a s^2 / TP = 5 x 64 x 4096^2 / 8 = 671,088,640 per layer.
    assert layer_activation_bytes(cfg70b, layout, 4096, 1, flash_attention=False) == (
        LAYER_BYTES + 671_088_640)


def test_70b_at_tp8_pp4_dp1_versus_dp4(cfg70b):
    # DP=1 (4 nodes): 18 bytes/param on stage 0: 2,172,190,720 x 18 = 39,099,432,960
    #   + 11,928,600,576 activations = 51,028,033,536 B = 47.52 GiB (37.19 GiB recomputing)
    dp1 = estimate(cfg70b, Layout(8, 4, 1, True, True), phase="sft")
    assert dp1.stage == 0 and dp1.params == STAGE0_PARAMS
    assert dp1.optimizer == 26_066_288_640  # 12 B x 2,172,190,720
    assert dp1.train_total == 51_028_033_536
    assert dp1.train_total_recompute == 39_099_432_960 + STAGE0_ACTS_RECOMPUTE
    # DP=4 (16 nodes): optimizer 12 / 4 = 3 B -> 9 B/param = 19,549,716,480
    #   + the same activations (16 / 4 = 4 micro-batches, still 4 in flight) = 31,478,317,056 B
    dp4 = estimate(cfg70b, Layout(8, 4, 4, True, True), phase="sft")
    assert dp4.optimizer == 6_516_572_160
    assert dp4.train_total == 31_478_317_056
    assert round(dp1.train_total / GIB, 2) == 47.52 and round(dp4.train_total / GIB, 2) == 29.32


def test_kv_cache(cfg70b):
    # 256 sequences x 4096 tokens x 20 layers (80 / PP 4) x 2 (K, V) x 1 KV head (8 / TP 8)
    #   x 128 x 2 bytes = 10,737,418,240 B = 10 GiB per GPU
    assert kv_cache_bytes(cfg70b, Layout(8, 4, 1, True, True)) == 10 * GIB
    # TP=16 > 8 KV heads: each GPU still holds a whole (replicated) KV head.
    assert kv_cache_bytes(cfg70b, Layout(16, 4, 1, True, True), batch=1, seq_len=1) == 20 * 2 * 128 * 2


def test_layouts_and_fit(cfg70b):
    layouts = valid_layouts(cfg70b, 8, 4)
    assert Layout(8, 4, 1, True, True) in layouts
    # TP stays in the node, divides 8 KV groups; PP divides 80 layers; DP divides the batch of 16.
    assert all(lay.tp in (1, 2, 4, 8) and 80 % lay.pp == 0 and 16 % lay.dp == 0 for lay in layouts)
    assert all(lay.tp * lay.pp * lay.dp == 32 for lay in layouts)
    plans = {p.estimate.layout: p for p in plan_layouts(cfg70b, 8, 4, 80)}
    assert plans[Layout(8, 4, 1, True, True)].fits_train  # the preset's own layout
    # One node's worth of model parallelism without PP cannot hold 70B with its optimizer.
    assert not plans[Layout(8, 1, 4, True, True)].fits_train


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", "--config", "llama2_70b", "--gpus-per-node", "8", "--nodes", "4",
                 "--gpu-mem-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "budget 72.0 of 80 GiB" in out
    starred = [line for line in out.splitlines() if line.startswith("*")]
    assert len(starred) == 1 and starred[0].split()[1:4] == ["8", "4", "1"]
    assert starred[0].endswith("fits")
