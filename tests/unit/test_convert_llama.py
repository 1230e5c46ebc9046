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
from megatron_selfreward.convert.hf_megatron import (  # noqa: E402
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)
from megatron_selfreward.convert.llama_map import (  # noqa: E402
    UnsupportedModelError,
    config_from_hf,
    fuse_qkv,
    hf_config_from_model,
    hf_to_megatron,
    hf_to_megatron_tensor,
    load_hf_into_model,
    megatron_to_hf,
    shard_for_tp,
    split_qkv,
)
from megatron_selfreward.megatron.checkpoint import load_model  # noqa: E402
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


# ---------------------------------------------------------------------------------------------
# Whole-directory conversion: HF -> Megatron distributed checkpoint -> HF


def read_tensors(hf: Path) -> dict[str, torch.Tensor]:
    weights = HFWeights(hf)
    return {name: weights.get(name) for name in weights.specs}


@pytest.mark.usefixtures("process_world")
def test_round_trip_is_bit_exact_and_checkpoint_logits_match(hf_dir, tokens, tmp_path):
    megatron_dir = convert_hf_to_megatron(hf_dir, tmp_path / "megatron")
    back = convert_megatron_to_hf(megatron_dir, tmp_path / "hf")
    original, returned = read_tensors(hf_dir), read_tensors(back)
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert (back / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()
    cfg = load_config(megatron_dir / "model_config.yaml")
    with single_process_world():
        model = build_model(cfg)
        load_model(model, megatron_dir)
        torch.testing.assert_close(megatron_logits(model, tokens), hf_logits(hf_dir, tokens), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory) -> Path:
    """bf16 weights in 4 shards with an index, as transformers writes large models."""
    root = tmp_path_factory.mktemp("sharded")
    model = transformers.LlamaForCausalLM.from_pretrained(make_hf_dir(root / "fp32", tied=False),
                                                          dtype=torch.bfloat16)
    model.save_pretrained(root / "model", max_shard_size="100KB")
    shutil.copy(root / "fp32" / "tokenizer_config.json", root / "model")
    assert (root / "model" / "model.safetensors.index.json").is_file()
    return root / "model"


@pytest.mark.usefixtures("process_world")
def test_sharded_bf16_round_trip_and_sharded_output(sharded_bf16, tmp_path):
    megatron_dir = convert_hf_to_megatron(sharded_bf16, tmp_path / "megatron")
    back = convert_megatron_to_hf(megatron_dir, tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, returned = read_tensors(sharded_bf16), read_tensors(back)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, returned[k]) for k, v in original.items())
    assert json.loads((back / "config.json").read_text()) == json.loads((sharded_bf16 / "config.json").read_text())
    # A bf16 checkpoint loads into an fp32 model (upcast on load) and exports as fp32 on request.
    cfg = load_config(megatron_dir / "model_config.yaml")
    with single_process_world():
        model = build_model(cfg)
        load_model(model, megatron_dir)
        assert torch.equal(model.embedding.word_embeddings.weight, original["model.embed_tokens.weight"].float())
    as_fp32 = convert_megatron_to_hf(megatron_dir, tmp_path / "fp32", dtype="float32")
    assert json.loads((as_fp32 / "config.json").read_text())["dtype"] == "float32"
    reloaded = transformers.LlamaForCausalLM.from_pretrained(as_fp32)
    assert reloaded.model.layers[1].mlp.up_proj.weight.dtype == torch.float32


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging debris"


def broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_fails_naming_it(sharded_bf16, tmp_path):
    bad = broken_copy(sharded_bf16, tmp_path / "bad")
    shard = bad / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(HFCheckpointError, match=r"model-00002-of-00004\.safetensors: truncated"):
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_missing_shard_fails_naming_it(sharded_bf16, tmp_path):
    bad = broken_copy(sharded_bf16, tmp_path / "bad")
    (bad / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match=r"model-00003-of-00004\.safetensors: missing shard"):
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_missing_tensor_fails_naming_it(hf_dir, tmp_path):
    from safetensors.torch import save_file

    bad = broken_copy(hf_dir, tmp_path / "bad")
    tensors = read_tensors(bad)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"bad: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Qwen2ForCausalLM"]}, "architecture .*Qwen2ForCausalLM"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "RoPE scaling of type 'llama3'"),
])
def test_unsupported_model_fails_naming_config(hf_dir, tmp_path, change, message):
    bad = broken_copy(hf_dir, tmp_path / "bad")
    config = {**json.loads((bad / "config.json").read_text()), **change}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=rf"bad/config\.json: {message}"):
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert_no_output(tmp_path / "out")


@pytest.mark.usefixtures("process_world")
def test_failure_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from megatron_selfreward.convert import hf_megatron

    calls = []

    def failing(get_tensor, cfg, name):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return hf_to_megatron_tensor(get_tensor, cfg, name)

    monkeypatch.setattr(hf_megatron, "hf_to_megatron_tensor", failing)
    with pytest.raises(Exception, match="disk full"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    assert_no_output(tmp_path / "out")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "weights").write_text("someone's")  # an empty directory would be reused
    with pytest.raises(FileExistsError):
        convert_hf_to_megatron(hf_dir, tmp_path / "exists")


# ---------------------------------------------------------------------------------------------
# Command-line tools and the TensorRT-LLM export (the engine build itself cannot run here)


def load_tool(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_tools_and_trtllm_export(hf_dir, tmp_path, capsys):
    from megatron_selfreward.generation.trtllm_build import export_for_trtllm, trtllm_build_commands

    to_megatron, to_hf = load_tool("convert_hf_to_megatron"), load_tool("convert_megatron_to_hf")
    assert to_megatron.main(["--hf", str(hf_dir), "--out", str(tmp_path / "m")]) == 0
    assert to_megatron.main(["--hf", str(hf_dir), "--out", str(tmp_path / "m")]) == 1  # exists
    assert "already exists" in capsys.readouterr().err
    assert to_hf.main(["--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "h"), "--dtype", "bfloat16"]) == 0
    assert HFWeights(tmp_path / "h").spec("model.norm.weight").dtype == torch.bfloat16

    cfg = load_config(tmp_path / "m" / "model_config.yaml",
                      ["generation.max_new_tokens=64", "judge.max_new_tokens=96"])
    spec = export_for_trtllm(cfg, tmp_path / "m", tmp_path / "trt_hf", tmp_path / "engine")
    assert (spec.max_seq_len, spec.max_input_len, spec.tp_size, spec.dtype) == (256, 128, 1, "bfloat16")
    assert json.loads((tmp_path / "trt_hf" / "trtllm_build.json").read_text())["max_input_len"] == 128
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "trt_hf")
    assert exported.dtype == torch.bfloat16
    convert, build = trtllm_build_commands(spec, "convert_checkpoint.py", str(tmp_path / "work"))
    assert convert[convert.index("--tp_size") + 1] == "1" and build[0] == "trtllm-build"
    assert build[build.index("--max_seq_len") + 1] == "256"
