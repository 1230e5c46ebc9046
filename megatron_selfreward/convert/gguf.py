"""Import a llama.cpp GGUF checkpoint as a Hugging Face Llama directory.

The result is what ``LlamaForCausalLM.from_pretrained(out_dir)`` and
``AutoTokenizer.from_pretrained(out_dir)`` expect: ``config.json``,
``generation_config.json``, ``model.safetensors`` (dequantized, HF tensor names) and
the tokenizer files. It is proven bit-exact against transformers' own GGUF loader
(``from_pretrained(dir, gguf_file=name)``) on SmolLM2-135M-Instruct; see
``tests/unit/test_gguf_import.py``.

Conversion is an explicit name map plus one tensor transform: undoing the row
permutation llama.cpp applies to the Q and K projections. Tensors are dequantized
and written one at a time, straight into the safetensors file, so peak memory is
one tensor, not the model. Output appears all at once: everything is written into
a hidden staging directory next to ``out_dir`` and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from megatron_selfreward.megatron.publish import refuse_existing, staged_directory

__all__ = ["GGUFImportError", "check_gguf_file", "import_gguf"]

Dtype = Literal["float32", "bfloat16"]
_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {torch.float32: "F32", torch.bfloat16: "BF16"}
_SUPPORTED_ARCH = "llama"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class GGUFImportError(ValueError):
    """A GGUF file cannot be imported; the message names the file."""


@dataclass(frozen=True)
class _TensorSpec:
    """One output tensor: where it comes from and what it must look like."""

    hf_name: str
    source: Any  # gguf.ReaderTensor
    shape: tuple[int, ...]
    rope_heads: int | None  # heads to un-permute over (Q and K only)


def import_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: Dtype = "float32",
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a ``llama``-architecture GGUF file into a Hugging Face Llama directory.

    Raises FileNotFoundError for a missing file, GGUFImportError (a ValueError) for an
    unreadable or truncated file and for any architecture but ``llama``, and
    FileExistsError when ``out_dir`` is a non-empty directory and ``overwrite`` is False.
    On any error nothing is left at ``out_dir``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
    torch_dtype = _TORCH_DTYPES[dtype]
    refuse_existing(out_dir, overwrite)  # before any work; again when publishing

    reader = _open_gguf(gguf_path)
    config = _llama_config(reader, gguf_path, dtype)
    specs = _plan_tensors(reader, config, gguf_path)
    tokenizer = _load_tokenizer(gguf_path)

    with staged_directory(out_dir, overwrite=overwrite) as staging:
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(config))
        metadata = {"format": "pt", "converted_from": gguf_path.name}
        _write_safetensors(staging / "model.safetensors", specs, torch_dtype, metadata)
        _write_tokenizer(tokenizer, staging, config["max_position_embeddings"])
    return out_dir


# -- reading the GGUF ------------------------------------------------------------------

# Sizes of the fixed-size GGUF metadata value types (gguf.GGUFValueType); 8 string, 9 array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 8  # ggml has 4; a larger count is a corrupt header, not a tensor


class _HeaderCursor:
    """Reads a GGUF header front to back; any read past the end of the file names the file."""

    def __init__(self, f: Any, path: Path, size: int) -> None:
        self.f, self.path, self.size, self.pos, self.order = f, path, size, 0, "little"

    def _advance(self, n: int) -> None:
        if self.pos + n > self.size:
            raise GGUFImportError(f"{self.path}: truncated GGUF file: its header runs past byte "
                                  f"{self.pos + n:,} but the file has {self.size:,} bytes")
        self.pos += n

    def take(self, n: int) -> bytes:
        self._advance(n)
        return self.f.read(n)

    def skip(self, n: int) -> None:
        self._advance(n)
        self.f.seek(n, os.SEEK_CUR)

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), self.order)

    def string(self) -> bytes:
        return self.take(self.uint(8))

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[vtype])
        elif vtype == _STRING:
            self.skip(self.uint(8))
        elif vtype == _ARRAY:
            etype, count = self.uint(4), self.uint(8)
            if etype in _SCALAR_BYTES:
                self.skip(count * _SCALAR_BYTES[etype])
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise GGUFImportError(f"{self.path}: corrupt GGUF header: unknown value type {vtype} "
                                  f"at byte {self.pos:,}")


def check_gguf_file(path: Path) -> None:
    """Check that the header of ``path`` parses and every tensor's data lies inside the file.

    GGUFReader maps the file and, on a truncated one, fails with whatever numpy raises first
    (a reshape of too few bytes); this names the file, the tensor cut off and the sizes.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _HeaderCursor(f, path, size)
        if cur.take(4) != b"GGUF":
            raise GGUFImportError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        raw = cur.take(4)
        if int.from_bytes(raw, "little") & 0xFFFF == 0:  # written on a big-endian machine
            cur.order = "big"
        version = int.from_bytes(raw, cur.order)
        if version not in (2, 3):
            raise GGUFImportError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.uint(8), cur.uint(8)
        alignment = 32  # GGUF's default when general.alignment is absent
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.uint(4)
            if key == b"general.alignment" and vtype == _UINT32:
                alignment = cur.uint(4)
            else:
                cur.skip_value(vtype)
        tensors = []
        for _ in range(n_tensors):
            name, n_dims = cur.string().decode("utf-8", "replace"), cur.uint(4)
            if n_dims > _MAX_DIMS:
                raise GGUFImportError(f"{path}: corrupt GGUF header: tensor {name!r} has {n_dims} dims")
            dims = [cur.uint(8) for _ in range(n_dims)]
            tensors.append((name, dims, cur.uint(4), cur.uint(8)))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFImportError(f"{path}: corrupt GGUF header: alignment {alignment}")
    data_start = -(-cur.pos // alignment) * alignment
    ends = {}
    for name, dims, ggml_type, offset in tensors:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFImportError(f"{path}: tensor {name!r} has unknown GGML type {ggml_type}") from None
        ends[name] = data_start + offset + math.prod(dims) // block * block_bytes
    last = max(ends, key=ends.__getitem__, default=None)
    if last is not None and ends[last] > size:
        cut = sum(end > size for end in ends.values())
        raise GGUFImportError(f"{path}: truncated GGUF file: its tensor data ends at byte {ends[last]:,} "
                              f"(tensor {last!r}) but the file has {size:,} bytes; {cut} of "
                              f"{len(ends)} tensors are cut off")


def _open_gguf(path: Path) -> Any:
    """A GGUFReader over ``path``; every way the file can be bad names the file."""
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    check_gguf_file(path)
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, OverflowError, struct.error) as err:
        # The reader fails on truncation with whatever numpy raises first
        # (reshape, view or index errors), so no single type covers it.
        raise GGUFImportError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err


def _field(reader: Any, key: str, path: Path, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFImportError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _float32_value(value: float) -> float:
    # GGUF stores these as float32; the shortest decimal that round-trips (1e-05,
    # not 9.999999747378752e-06) keeps config.json readable and loses nothing.
    return float(str(np.float32(value)))


def _llama_config(reader: Any, path: Path, dtype: Dtype) -> dict[str, Any]:
    """The LlamaConfig fields, from the GGUF metadata (llama.cpp key names)."""
    arch = _field(reader, "general.architecture", path)
    if arch != _SUPPORTED_ARCH:
        raise GGUFImportError(
            f"{path}: GGUF architecture {arch!r} is not supported (only {_SUPPORTED_ARCH!r})"
        )
    key = lambda name, default=...: _field(reader, f"llama.{name}", path, default)  # noqa: E731
    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise GGUFImportError(f"{path}: RoPE scaling {scaling!r} is not supported")
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    # llama.cpp states the vocabulary size only sometimes; the token list always.
    vocab = key("vocab_size", None) or len(reader.fields["tokenizer.ggml.tokens"].data)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        # Absent in files without grouped-query attention: then every head has its own KV.
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", None) or key("rope.dimension_count", hidden // heads),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": _float32_value(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(key("rope.freq_base", 10000.0)),  # llama.cpp's default
        "max_position_embeddings": key("context_length"),
        "vocab_size": vocab,
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "torch_dtype": dtype,
    }
    for name in ("bos", "eos", "pad"):
        gguf_name = "padding" if name == "pad" else name
        token_id = _field(reader, f"tokenizer.ggml.{gguf_name}_token_id", path, None)
        if token_id is not None:
            config[f"{name}_token_id"] = token_id
    return config


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {name: config[name] for name in ids if name in config}


# -- tensors ---------------------------------------------------------------------------


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK_NAMES:
        return None
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.weight"


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF Llama of this config has, with its (out, in) shape."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    per_layer = {
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "self_attn.q_proj": (q_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }
    for layer in range(config["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    return shapes


def _plan_tensors(reader: Any, config: dict[str, Any], path: Path) -> list[_TensorSpec]:
    """Map every GGUF tensor to its HF name and check the set against the config.

    Everything is checked before anything is written, so a file that would give a
    model HF cannot load (unknown tensors, missing layers, wrong shapes) is refused.
    """
    rope_heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    specs, unknown = [], []
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            unknown.append(tensor.name)
            continue
        # GGUF lists dimensions innermost first; torch wants (out, in).
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        heads = next((n for part, n in rope_heads.items() if f".{part}." in hf_name), None)
        specs.append(_TensorSpec(hf_name, tensor, shape, heads))
    if unknown:
        raise GGUFImportError(f"{path}: tensors with no Hugging Face Llama equivalent: {unknown[:8]}")
    expected = _expected_shapes(config)
    found = {spec.hf_name: spec.shape for spec in specs}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:8]
        wrong = sorted(n for n in found if n in expected and found[n] != expected[n])[:8]
        raise GGUFImportError(f"{path}: tensors do not match the config: missing {missing}, wrong shape {wrong}")
    return specs


def _undo_rope_permutation(weights: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter reorders each head's Q/K rows so its RoPE kernel can
    # rotate adjacent pairs (x0, x1), (x2, x3)...; HF's rotate_half pairs row i with
    # row i + head_dim/2. Swapping the two middle axes back restores HF's order.
    rows = weights.shape[0]
    pairs = weights.reshape(n_heads, rows // n_heads // 2, 2, *weights.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weights.shape)


def _load_tensor(spec: _TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one tensor to float32 (as transformers does), then cast."""
    from gguf import dequantize

    weights = dequantize(spec.source.data, spec.source.tensor_type).reshape(spec.shape)
    if spec.rope_heads is not None:
        weights = _undo_rope_permutation(weights, spec.rope_heads)
    # F32 tensors come back as views of the read-only memory map.
    if not weights.flags.writeable or not weights.flags.c_contiguous:
        weights = np.array(weights, order="C")
    return torch.from_numpy(weights).to(dtype)


def _write_safetensors(
    path: Path, specs: list[_TensorSpec], dtype: torch.dtype, metadata: dict[str, str]
) -> None:
    """Write a safetensors file tensor by tensor.

    safetensors' own save_file needs every tensor in memory at once (and copies each
    to bytes); the format is a JSON header of shapes and byte offsets followed by the
    raw data, and the header only needs shapes, which the GGUF already gives us.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    ordered = sorted(specs, key=lambda spec: spec.hf_name)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in ordered:
        nbytes = math.prod(spec.shape) * itemsize
        header[spec.hf_name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the reference writer aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for spec in ordered:
            out.write(_load_tensor(spec, dtype).contiguous().view(torch.uint8).numpy())
        if out.tell() != 8 + len(blob) + offset:
            raise AssertionError(f"{path}: wrote {out.tell()} bytes, planned {8 + len(blob) + offset}")


# -- tokenizer -------------------------------------------------------------------------


def _load_tokenizer(gguf_path: Path) -> Any:
    """The tokenizer transformers builds from the GGUF metadata.

    Going through the public AutoTokenizer entry point (rather than transformers'
    internal GGUF helpers, which moved between releases) makes "encodes the same as
    transformers' GGUF tokenizer" true by construction.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _write_tokenizer(tokenizer: Any, out_dir: Path, max_length: int) -> None:
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name) is not None}
    config = {
        # The generic fast class loads tokenizer.json as is; a model-specific class
        # (LlamaTokenizer) would rebuild its own pre-tokenizer around the vocabulary.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tokenizer, "add_eos_token", False)),
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
        "model_max_length": max_length,
        "chat_template": tokenizer.chat_template,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


# -- output ----------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    # Only ever called inside the staging directory, which is published by one rename.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
