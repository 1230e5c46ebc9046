"""Selecting the TensorRT-LLM engine where it cannot run is a clear error, before any model loads.

(What the engine does where TensorRT-LLM imports: tests/unit/test_trtllm_engine.py.)"""

from __future__ import annotations

import sys

import pytest

from megatron_selfreward.config import load_config
from megatron_selfreward.policy import check_engine_available, load_policy
from tests.conftest import CONFIGS


def test_trtllm_engine_without_tensorrt_llm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # not importable, also where it is installed
    cfg = load_config(CONFIGS / "tiny.yaml", ["generation.engine=trtllm"])
    with pytest.raises(RuntimeError, match="generation.engine") as err:
        load_policy(cfg, tmp_path)  # no model dir needed: it refuses first
    assert "generation.engine=megatron" in str(err.value)


def test_megatron_engine_is_available_where_tensorrt_llm_is_not(monkeypatch):
    """The same installation (no TensorRT-LLM): the check refuses trtllm and lets megatron pass,
    so it reads the configured engine rather than refusing or allowing everything."""
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # not importable, also where it is installed
    megatron = load_config(CONFIGS / "tiny.yaml")
    assert megatron.generation.engine == "megatron"
    check_engine_available(megatron)  # raises if it refused
    with pytest.raises(RuntimeError, match="cannot be imported"):
        check_engine_available(load_config(CONFIGS / "tiny.yaml", ["generation.engine=trtllm"]))


def test_a_sequence_parallel_config_generates_from_its_checkpoint(tmp_path):
    """Training with sequence parallelism leaves checkpoints generation can load: the generation
    model is built with it off (here at TP = 1, where megatron refuses sequence parallelism
    outright, so a build that kept it fails)."""
    import dataclasses

    from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
    from megatron_selfreward.megatron.checkpoint import save_model
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    cfg = load_config(CONFIGS / "tiny.yaml")
    trained = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sequence_parallel=True))
    with single_process_world():
        save_model(build_model(cfg), tmp_path / "megatron")
        policy = load_policy(trained, tmp_path)
        result = policy.engine.generate([GenerationRequest("r", [1, 2, 3], SamplingParams(
            temperature=0.0, max_new_tokens=2))])
    assert policy.model.config.sequence_parallel is False
    assert len(result[0].samples[0].token_ids) == 2
