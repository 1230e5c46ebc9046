"""The real SmolLM2-135M-Instruct through GGUF -> HF -> Megatron distributed checkpoint, via the
`selfreward convert` CLI, continues a prompt greedily exactly as transformers does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
from megatron_selfreward.generation.megatron_engine import MegatronEngine
from megatron_selfreward.megatron.checkpoint import load_model
from megatron_selfreward.megatron.model import build_model
from megatron_selfreward.megatron.parallel import single_process_world
from tests.conftest import CONFIGS, REPO


def convert(*args: str) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_selfreward.cli", "convert", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_gguf_to_hf_to_megatron_greedy_equals_transformers(tmp_path: Path):
    import transformers

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "megatron"
    convert("gguf-to-hf", "smollm2", str(hf_dir))
    convert("hf-to-megatron", str(hf_dir), str(ckpt))
    assert (ckpt / "metadata.json").is_file() and (ckpt / "tokenizer").is_dir()

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = tokenizer("The three primary colours are")["input_ids"]
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    del hf

    # fp32 like the transformers reference (the CPU preset itself trains in bf16).
    cfg = load_config(CONFIGS / "smollm2_135m_cpu.yaml", ["precision.params_dtype=float32",
                                                           "model.hidden_dropout=0.0",
                                                           "model.attention_dropout=0.0"])
    with single_process_world():
        model = build_model(cfg)
        load_model(model, ckpt)
        engine = MegatronEngine(model.eval(), cfg, tokenizer=tokenizer, eos_token_ids=[])
        request = GenerationRequest("colours", prompt, SamplingParams(temperature=0.0, max_new_tokens=12))
        (sample,) = engine.generate([request])[0].samples
    assert sample.token_ids == expected
