"""Generation has a layout of its own: TP per replica (generation.tensor_parallel_size), no
pipeline parallelism, replicas over the sampling/judging job's GPUs; training's TP x PP is not
what sampling asks for (70B: training TP 8 x PP 4 over 32 GPUs, generation one TP-8 replica per
8-GPU array task)."""

from __future__ import annotations

import pytest

from megatron_selfreward.config import ConfigError, generation_tp, load_config
from tests.conftest import CONFIGS

GIB = 1024 ** 3


@pytest.fixture(scope="module")
def cfg70b():
    return load_config(CONFIGS / "llama2_70b.yaml")


def test_the_generation_layout_defaults_to_training_tp_and_is_validated():
    cfg = load_config(CONFIGS / "tiny.yaml", ["parallel.tensor_model_parallel_size=2"])
    assert cfg.generation.tensor_parallel_size == 0 and generation_tp(cfg) == 2
    assert generation_tp(load_config(CONFIGS / "tiny.yaml", ["generation.tensor_parallel_size=2"])) == 2
    with pytest.raises(ConfigError, match="generation.tensor_parallel_size.*heads 4 .*TP=8"):
        load_config(CONFIGS / "tiny.yaml", ["generation.tensor_parallel_size=8"])
    with pytest.raises(ConfigError, match="generation.tensor_parallel_size"):
        load_config(CONFIGS / "tiny.yaml", ["generation.tensor_parallel_size=-1"])


def test_the_generation_model_is_built_in_the_generation_layout(cfg70b):
    from megatron_selfreward.policy import generation_config

    gen = generation_config(cfg70b)
    p = gen.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel) == (8, 1, False)
    assert cfg70b.parallel.pipeline_model_parallel_size == 4  # training's is untouched
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert generation_config(tiny) is tiny


def test_tensorrt_llm_is_asked_for_one_replica_of_the_generation_layout(cfg70b, tmp_path):
    from megatron_selfreward.generation.trtllm_build import build_spec

    spec = build_spec(cfg70b, tmp_path / "hf", tmp_path / "engine")
    assert (spec.tp_size, spec.pp_size) == (8, 1)


def test_plan_prints_replicas_memory_and_prompts_per_replica(cfg70b):
    from megatron_selfreward.perf.memory_plan import format_generation_plan, generation_plan

    plan = generation_plan(cfg70b, gpus_per_node=8, gpu_mem_gib=80)
    # 2 array tasks x 1 node x 8 GPUs: TensorRT-LLM runs one TP-8 replica per task.
    assert (plan.tp, plan.replicas, plan.gpus_used, plan.gpus_total) == (8, 2, 16, 16)
    # 70B bf16 weights over 8 GPUs (~17.2 GB each); KV cache: 256 rows x 4096 tokens x 80 layers
    # x K and V x 1 KV head (8 groups / TP 8) x 128 dims x 2 bytes.
    assert 15.5 * GIB < plan.weights < 16.5 * GIB
    assert plan.kv_cache == 256 * 4096 * 80 * 2 * 1 * 128 * 2 and plan.fits
    assert plan.sample_prompts == 8000 // 2 and plan.judge_requests == 8000 * 4 * 3 // 2
    text = format_generation_plan(cfg70b, plan)
    assert "TP 8 x PP 1 per replica" in text and "2 replica(s)" in text and "training: TP 8 x PP 4" in text
    # The Megatron engine: every GPU of a task is a rank, TP of them per replica.
    megatron = load_config(CONFIGS / "llama2_70b.yaml", ["generation.engine=megatron",
                                                        "generation.tensor_parallel_size=4"])
    assert generation_plan(megatron, 8, 80).replicas == 4
    # A replica wider than a task's GPUs fits nowhere, and the plan says what to change.
    wide = load_config(CONFIGS / "llama2_70b.yaml", ["executor.slurm.gpus_per_node=4",
                                                     "executor.slurm.nodes=8"])
    assert generation_plan(wide, 4, 80).replicas == 0
    assert "NO replica fits" in format_generation_plan(wide, generation_plan(wide, 4, 80))


def test_tensorrt_llm_stages_are_one_process_per_replica(monkeypatch):
    from megatron_selfreward.pipeline.workers import generation_workers
    from megatron_selfreward.stages.shards import SINGLE

    cfg = load_config(CONFIGS / "tiny.yaml", ["generation.engine=trtllm"])
    # Under `srun ... trtllm-llmapi-launch` our process is rank 0 of the launch; the other ranks
    # are TensorRT-LLM's workers: no torch.distributed world is formed.
    launch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
              "SLURM_JOB_NODELIST": "gpu1", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}
    with generation_workers(cfg, environ=launch) as workers:
        assert workers == SINGLE
    array = dict(launch, SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="4")
    with generation_workers(cfg, array=True, environ=array) as workers:
        assert (workers.rank, workers.size, workers.gathers) == (3, 4, False)
    with pytest.raises(ConfigError, match="trtllm-llmapi-launch"):
        with generation_workers(cfg, environ=dict(launch, SLURM_PROCID="1")):
            pass
