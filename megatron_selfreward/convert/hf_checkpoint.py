"""Hugging Face checkpoint directories, read and written one tensor at a time.

Conversion must not hold a model in memory, and a bad input must be reported naming the file.
So this module reads safetensors itself: the header is parsed and checked against the file size
up front (a truncated download fails before any work is done), and each tensor is read with a
plain `readinto` into its own buffer (no mmap, so resident memory is one tensor, not the file).
Writing is the mirror image: the header is computed from the tensor shapes first, then tensors
are produced and written one by one; shards plus `model.safetensors.index.json` above a size
threshold, as `transformers` expects.

The safetensors format: 8-byte little-endian header length, a JSON header mapping each name to
{dtype, shape, data_offsets}, then the raw little-endian tensor bytes. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = [
    "HFCheckpointError",
    "HFWeights",
    "TensorSpec",
    "copy_tokenizer_files",
    "read_hf_config",
    "write_hf_weights",
    "write_safetensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' own default shard size for save_pretrained.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_MAX_HEADER_BYTES = 100 * 1024**2  # the format's own limit; guards against reading garbage

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Files a tokenizer (and generation defaults) may live in; copied alongside converted weights.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint cannot be read; the message names the file."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one stored tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{path}: missing (not a Hugging Face model directory?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{path}: must hold a JSON object")
    return data


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Parse and validate a safetensors header against the file's real size."""
    if not path.is_file():
        raise HFCheckpointError(f"{path}: safetensors file is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFCheckpointError(f"{path}: truncated or corrupt safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise HFCheckpointError(
                f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes "
                f"in a {size}-byte file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{path}: corrupt safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    specs = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        specs[name] = _tensor_spec(path, name, entry, data_start, size)
    return specs


def _tensor_spec(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorSpec:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise HFCheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {err}") from err
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
        raise HFCheckpointError(
            f"{path}: corrupt header entry for tensor {name!r}: byte range {begin}..{end} does "
            f"not hold shape {list(shape)} of {entry['dtype']}"
        )
    if data_start + end > size:
        raise HFCheckpointError(
            f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
            f"{data_start + end} but the file has {size} bytes"
        )
    return TensorSpec(name, path, dtype, shape, data_start + begin, data_start + end)


class HFWeights:
    """The tensors of a HF directory (one model.safetensors, or shards with an index).

    All headers are read and checked at construction; `get(name)` then reads one tensor.
    """

    def __init__(self, hf_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(hf_dir)
        self.specs: dict[str, TensorSpec] = {}
        for file, names in self._files().items():
            header = read_safetensors_header(self.dir / file)
            for name in names if names is not None else header:
                if name not in header:
                    raise HFCheckpointError(
                        f"{self.dir / file}: tensor {name!r} is listed in {INDEX_FILE} but not "
                        "stored in this shard"
                    )
                self.specs[name] = header[name]

    def _files(self) -> dict[str, list[str] | None]:
        """File name -> the tensor names the index promises in it (None: whatever is there)."""
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise HFCheckpointError(f"{index}: not a valid safetensors index: {err}") from err
            files: dict[str, list[str] | None] = {}
            for name, file in weight_map.items():
                if "/" in file or file.startswith("."):
                    raise HFCheckpointError(f"{index}: shard name {file!r} leaves the directory")
                files.setdefault(file, []).append(name)  # type: ignore[union-attr]
            for file in files:
                if not (self.dir / file).is_file():
                    raise HFCheckpointError(
                        f"{self.dir / file}: missing shard (listed in {index.name})"
                    )
            return files
        if (self.dir / SINGLE_FILE).is_file():
            return {SINGLE_FILE: None}
        others = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
        hint = f" (found {others[0]}: pickled .bin weights are not read; convert to safetensors)" if others else ""
        raise HFCheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def spec(self, name: str) -> TensorSpec:
        if name not in self.specs:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self.specs[name]

    def get(self, name: str) -> torch.Tensor:
        spec = self.spec(name)
        buf = torch.empty(spec.end - spec.begin, dtype=torch.uint8)
        with open(spec.file, "rb") as f:
            f.seek(spec.begin)
            got = f.readinto(buf.numpy())
        if got != buf.numel():
            raise HFCheckpointError(f"{spec.file}: truncated while reading tensor {name!r}")
        return buf.view(spec.dtype).reshape(spec.shape)

    def total_bytes(self) -> int:
        return sum(s.end - s.begin for s in self.specs.values())


# ---------------------------------------------------------------------------------------------
# Writing


def _header_bytes(items: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in items:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Tensor data starts 8-byte aligned, as the reference writer does.
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(
    path: Path,
    items: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
) -> None:
    """Write one safetensors file, asking `produce(name)` for each tensor in turn."""
    header = _header_bytes(items)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, shape, dtype in items:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor
        f.flush()
        os.fsync(f.fileno())


def _plan_shards(
    items: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item[1]) * item[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def write_hf_weights(
    out_dir: Path,
    items: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index above the threshold."""
    shards = _plan_shards(items, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out_dir / SINGLE_FILE, shards[0], produce)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        write_safetensors(out_dir / file, shard, produce)
        weight_map.update({name: file for name, _, _ in shard})
    total = sum(math.prod(s) * d.itemsize for _, s, d in items)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_FILE]


def copy_tokenizer_files(src: Path, dst: Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    """Copy whichever tokenizer files exist in `src` into `dst`; returns the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
