"""HF Llama <-> Megatron conversion, proven against `transformers.LlamaForCausalLM` on CPU.

A tiny random GQA Llama (2 layers, hidden 64, 4 heads / 2 KV heads, vocab 512, fp32, eager
attention) is saved by transformers itself; our Megatron GPTModel loaded from it must give the
same logits, tied and untied. The HF -> Megatron -> HF round trip must give back every tensor
bit for bit and the same config.json. Bad inputs must fail naming the file and leave nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_selfreward.config import load_config  # noqa: E402
from megatron_selfreward.convert.hf_checkpoint import HFCheckpointError, HFWeights  # noqa: E402
from megatron_selfreward.convert.llama_map import (  # noqa: E402
    UnsupportedModelError,
    config_from_hf,
    fuse_qkv,
    hf_config_from_model,
    hf_to_megatron,
    load_hf_into_model,
    megatron_to_hf,
    shard_for_tp,
    split_qkv,
)
from megatron_selfreward.megatron.model import build_model  # noqa: E402
from megatron_selfreward.megatron.parallel import single_process_world  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
            max_position_embeddings=256)
SEQ = 16


def make_hf_dir(path: Path, tied: bool, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama saved by transformers (its layout is the reference)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tied,
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return path


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model.eval()(tokens, positions, attention_mask=None)


def tiny_cfg(hf_dir: Path):
    overrides = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    return load_config(None, [f"model.{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "model", tied=request.param)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(3))


def test_loaded_model_logits_equal_transformers(hf_dir, tokens):
    cfg = tiny_cfg(hf_dir)
    with single_process_world():
        model = build_model(cfg)
        load_hf_into_model(model, hf_dir, cfg)
        ours = megatron_logits(model, tokens)
    ref = hf_logits(hf_dir, tokens)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_a_wrong_qkv_order_is_caught(hf_dir, tokens):
    """Negative control: the logits comparison is sensitive to the fused QKV layout."""
    cfg = tiny_cfg(hf_dir)
    with single_process_world():
        model = build_model(cfg)
        load_hf_into_model(model, hf_dir, cfg)
        qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
        with torch.no_grad():
            q, k, v = split_qkv(qkv.clone(), 4, 2)
            qkv.copy_(torch.cat([q, k, v]))  # plain [q; k; v]: not megatron's grouped layout
        ours = megatron_logits(model, tokens)
    assert (ours - hf_logits(hf_dir, tokens)).abs().max() > 1e-3


def test_qkv_fuse_split_and_tp_shards_are_inverse():
    q, k, v = torch.randn(64, 8), torch.randn(32, 8), torch.randn(32, 8)
    fused = fuse_qkv(q, k, v, heads=4, groups=2)
    # Group 0 = q heads 0-1, k head 0, v head 0 (head dim 16).
    torch.testing.assert_close(fused[:32], q[:32])
    torch.testing.assert_close(fused[32:48], k[:16])
    torch.testing.assert_close(fused[48:64], v[:16])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 4, 2), (q, k, v)))
    fc1 = torch.cat([torch.zeros(4, 2), torch.ones(4, 2)])  # gate = 0, up = 1
    assert shard_for_tp("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2).tolist() == [[0, 0]] * 2 + [[1, 1]] * 2
    proj = torch.arange(8.0).reshape(2, 4)
    assert shard_for_tp("x.self_attention.linear_proj.weight", proj, 1, 2).tolist() == [[2, 3], [6, 7]]


def test_vocab_padding_and_stripping():
    cfg = load_config(None, ["model.vocab_size=511", "parallel.tensor_model_parallel_size=2",
                             "parallel.world_size=2", "sft.global_batch_size=16"])
    hf = {"model.embed_tokens.weight": torch.randn(511, 64), "lm_head.weight": torch.randn(511, 64),
          "model.norm.weight": torch.randn(64)}
    out = dict(hf_to_megatron(hf.__getitem__, cfg, range(0), pre_process=True, post_process=True))
    assert out["embedding.word_embeddings.weight"].shape == (512, 64)
    assert out["output_layer.weight"][511].abs().sum() == 0
    back = dict(megatron_to_hf(out.__getitem__, cfg, range(0)))
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_config_maps_both_ways(hf_dir):
    original = json.loads((hf_dir / "config.json").read_text())
    cfg = tiny_cfg(hf_dir)
    assert cfg.model.num_query_groups == 2 and cfg.model.ffn_hidden_size == 160
    fresh = hf_config_from_model(cfg)
    assert config_from_hf(fresh) == config_from_hf(original)
    assert hf_config_from_model(cfg, base=original) == original
    assert transformers.LlamaConfig(**fresh).rope_parameters["rope_theta"] == cfg.model.rope_theta


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 128}, "sliding-window"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "llama3"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_are_refused(hf_dir, change, message):
    hf = {**json.loads((hf_dir / "config.json").read_text()), **change}
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(hf, "some/config.json")
    mistral = {**json.loads((hf_dir / "config.json").read_text()),
               "architectures": ["MistralForCausalLM"], "sliding_window": None}
    assert config_from_hf(mistral)["num_layers"] == 2


def test_truncated_safetensors_is_named(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: truncated"):
        HFWeights(bad)
    weights.write_bytes(b"\x05\x00")
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        HFWeights(bad)
