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


def test_megatron_engine_is_always_available():
    check_engine_available(load_config(CONFIGS / "tiny.yaml"))
