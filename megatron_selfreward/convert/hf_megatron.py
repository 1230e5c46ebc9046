"""Convert a Hugging Face Llama directory to a Megatron distributed checkpoint and back.

`convert_hf_to_megatron(hf_dir, out_dir)` writes a checkpoint in the TP=1/PP=1 layout that
`megatron_selfreward.megatron.checkpoint.load_model` loads at any TP/PP (dist_checkpointing
reshards on load), plus `model_config.yaml` (the `model:` config section), the original
`hf_config.json` (so the way back reproduces it) and the tokenizer files under `tokenizer/`.
`convert_megatron_to_hf(ckpt_dir, out_dir)` is the reverse: safetensors (sharded with an index
above a size threshold), `config.json` and the tokenizer files.

Bounded memory: neither direction builds the model. The checkpoint's *layout* (keys, global
shapes, offsets, replica ids, the SwiGLU fc1 split into two shards) is taken from megatron's own
`GPTModel.sharded_state_dict()` of a model built on the meta device, so it is exactly what a
real model asks for at load time. Saving goes through `dist_checkpointing.save` with a save
strategy whose planner produces each tensor only when the writer asks for it, and torch's
FileSystemWriter writes one file per tensor (with one file per rank it keeps every tensor of the
file alive until the file is closed). Reading back loads one layer at a time. Peak memory is
a few tensors; see benchmarks/convert_memory.py.

Outputs are written into a hidden staging directory beside `out_dir` and renamed into place
only when complete, so a failed conversion leaves nothing behind.

Both directions run in a 1-process world with megatron's parallel state that the caller opens
(`megatron_selfreward.megatron.parallel.single_process_world()`; `selfreward convert` and the
TensorRT-LLM export do); inputs are checked before the world is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from megatron_selfreward.config import Config, ModelConfig, load_config
from megatron_selfreward.convert.hf_checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    TOKENIZER_FILES,
    HFWeights,
    copy_tokenizer_files,
    read_hf_config,
    write_hf_weights,
)
from megatron_selfreward.convert.llama_map import (
    checkpoint_tensor_name,
    config_from_hf,
    hf_config_from_model,
    hf_tensor_shapes,
    hf_to_megatron_tensor,
    megatron_to_hf_tensor,
)
from megatron_selfreward.io import atomic_write_json, atomic_write_text
from megatron_selfreward.megatron.checkpoint import MODEL_PREFIX
from megatron_selfreward.megatron.parallel import serial_intra_op
from megatron_selfreward.megatron.publish import staged_directory

__all__ = [
    "ConversionError",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "read_model_config",
]

MODEL_CONFIG_FILE = "model_config.yaml"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file or directory."""


# ---------------------------------------------------------------------------------------------
# Shared plumbing


def _require_world() -> None:
    """Conversion runs in a 1-process world with megatron's parallel state (TP=1/PP=1), which
    whoever runs it opens (`selfreward convert`, the TensorRT-LLM export): the converter builds
    megatron's meta layout and reads and writes through dist_checkpointing, it owns no world."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        raise RuntimeError(
            "checkpoint conversion needs a process world: call it inside "
            "megatron_selfreward.megatron.parallel.single_process_world() (`selfreward convert` opens one)"
        )
    if dist.get_world_size() > 1:
        raise RuntimeError("checkpoint conversion runs in a single process; call it outside torchrun")


def _conversion_config(model: ModelConfig, dtype: torch.dtype) -> Config:
    if dtype not in DTYPE_NAMES:
        raise ConversionError(f"weights of dtype {dtype} are not supported (float32, bfloat16, float16)")
    cfg = load_config(None, [f"precision.params_dtype={DTYPE_NAMES[dtype]}"])
    return dataclasses.replace(cfg, model=model)


def _meta_layout(cfg: Config) -> dict[str, Any]:
    """megatron's own sharded state dict of the whole model, on the meta device (no memory)."""
    from megatron_selfreward.megatron.model import build_model

    model = build_model(cfg, meta=True)
    return model.sharded_state_dict(prefix=MODEL_PREFIX)


def read_model_config(ckpt_dir: str | os.PathLike[str]) -> ModelConfig:
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ConversionError(
            f"{path}: missing; a converted checkpoint carries its model config there "
            "(or pass model_cfg=)"
        )
    return load_config(path).model


# ---------------------------------------------------------------------------------------------
# HF -> Megatron


class _LastTensorCache:
    """Produces full megatron tensors by name, keeping only the most recent one (fc1's two
    checkpoint shards are consecutive write items cut from the same tensor)."""

    def __init__(self, produce: Callable[[str], torch.Tensor]) -> None:
        self._produce = produce
        self._name: str | None = None
        self._tensor: torch.Tensor | None = None

    def __call__(self, name: str) -> torch.Tensor:
        if name != self._name:
            self._tensor = None  # drop the old one before building the next
            self._tensor = self._produce(name).contiguous()
            self._name = name
        assert self._tensor is not None
        return self._tensor


def _lazy_sources(layout: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple, tuple]]:
    """Build factories (fc1) and map each checkpoint shard (key, global offset) to
    (llama_map tensor name, view geometry inside that tensor or None for all of it).

    Names come from the shard's checkpoint key, not from the module state key, so they are the
    same whichever layer spec (local or Transformer Engine) built the layout."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    flat: dict[str, Any] = {}
    sources: dict[tuple, tuple] = {}
    for state_key, entry in layout.items():
        if isinstance(entry, ShardedTensorFactory):
            # The factory's shards are views of the (meta) parameter: keep their geometry.
            built = entry.build()
            for shard in built:
                geometry = (tuple(shard.data.shape), shard.data.stride(), shard.data.storage_offset())
                sources[(shard.key, tuple(shard.global_offset))] = (
                    checkpoint_tensor_name(shard, MODEL_PREFIX), geometry)
            flat[state_key] = built
        else:
            if isinstance(entry, ShardedTensor):
                sources[(entry.key, tuple(entry.global_offset))] = (
                    checkpoint_tensor_name(entry, MODEL_PREFIX), None)
            flat[state_key] = entry
    return flat, sources


def _streaming_strategy(resolve: Callable[[str, tuple], torch.Tensor]) -> Any:
    """A torch_dist save strategy whose tensors are produced when written, one at a time."""
    from megatron_selfreward.megatron.internals import streaming_save_strategy

    return streaming_save_strategy(resolve, on_failure=_unwrap)


def _unwrap(err: BaseException) -> BaseException:
    """torch DCP wraps errors in CheckpointException, a BaseException (not caught by
    `except Exception`): hand back the first rank's original error instead."""
    for failure in getattr(err, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, BaseException):
            return cause
    return ConversionError(str(err))


def _check_hf_tensors(weights: HFWeights, model: ModelConfig) -> torch.dtype:
    """Every tensor the model needs is there with the right shape; returns the weights' dtype."""
    for name, shape in hf_tensor_shapes(model).items():
        spec = weights.spec(name)
        if spec.shape != shape:
            raise ConversionError(
                f"{spec.file}: tensor {name!r} has shape {list(spec.shape)}, config.json implies "
                f"{list(shape)}"
            )
    return weights.spec("model.embed_tokens.weight").dtype


def _write_megatron(weights: HFWeights, cfg: Config, target: Path) -> None:
    from megatron.core import dist_checkpointing

    dtype = cfg.precision.params_dtype
    produce = _LastTensorCache(
        lambda name: hf_to_megatron_tensor(weights.get, cfg, name).to(getattr(torch, dtype)))
    _require_world()
    layout, sources = _lazy_sources(_meta_layout(cfg))

    def resolve(key: str, offset: tuple) -> torch.Tensor:
        name, geometry = sources[(key, offset)]
        full = produce(name)
        return full if geometry is None else full.as_strided(*geometry)

    with serial_intra_op():
        dist_checkpointing.save(layout, target, sharded_strategy=_streaming_strategy(resolve))


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """HF Llama directory -> Megatron distributed checkpoint (TP=1 layout) + config + tokenizer.

    `dtype` ("float32" / "bfloat16" / "float16") defaults to the HF weights' own dtype."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = read_hf_config(hf_dir)
    fields = config_from_hf(hf_config, str(hf_dir / "config.json"))
    weights = HFWeights(hf_dir)
    model = dataclasses.replace(ModelConfig(), **fields, name=hf_dir.name, source="megatron",
                                path=str(out_dir.resolve()))
    weights_dtype = _check_hf_tensors(weights, model)
    cfg = _conversion_config(model, getattr(torch, dtype) if dtype else weights_dtype)
    with staged_directory(out_dir, overwrite=overwrite) as staging:
        _write_megatron(weights, cfg, staging)
        header = "# The model section of megatron_selfreward's config for this checkpoint.\n"
        atomic_write_text(staging / MODEL_CONFIG_FILE,
                          header + yaml.safe_dump({"model": dataclasses.asdict(model)}, sort_keys=False))
        atomic_write_json(staging / HF_CONFIG_FILE, hf_config)
        copy_tokenizer_files(hf_dir, staging / TOKENIZER_DIR)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Megatron -> HF

_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.")


class _LayerReader:
    """Full megatron tensors by (llama_map) name, read from the checkpoint one layer (or one
    non-layer tensor) at a time; only the current group is kept. Names come from checkpoint keys,
    so any layer spec's layout reads any checkpoint."""

    def __init__(self, ckpt_dir: Path, layout: dict[str, Any], num_layers: int) -> None:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        self.ckpt_dir = ckpt_dir
        self.num_layers = num_layers
        self.groups: dict[str, dict[str, Any]] = {}
        for entry in layout.values():
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                name = checkpoint_tensor_name(entry, MODEL_PREFIX)
                self.groups.setdefault(self._group(name), {})[name] = entry
        self._current: tuple[str, dict[str, torch.Tensor]] | None = None

    @staticmethod
    def _group(name: str) -> str:
        match = _LAYER_KEY.match(name)
        return match.group(0) if match else name

    def get(self, name: str) -> torch.Tensor:
        group = self._group(name)
        if self._current is None or self._current[0] != group:
            self._current = None
            self._current = (group, self._load(group))
        return self._current[1][name]

    def _request(self, group: str) -> dict[str, Any]:
        """One layer is asked for as a plain 3-D slab [i:i+1] of the stacked tensor: megatron's
        per-layer view (prepended axis, fc1 split) with a partial request is refused in a
        1-process world, the plain slab is resharded by torch DCP like any other read."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        match = _LAYER_KEY.match(group)
        request = {}
        for name, entry in self.groups[group].items():
            if match is None:
                request[name] = dataclasses.replace(entry, data=torch.empty_like(entry.data, device="cpu"))
                continue
            slab = torch.empty((1, *entry.data.shape), dtype=entry.data.dtype)
            request[name] = ShardedTensor.from_rank_offsets(
                entry.key, slab, (0, int(match.group(1)), self.num_layers))
        return request

    def _load(self, group: str) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            # Only part of each stacked layer tensor is requested: skip the whole-model check.
            with serial_intra_op():
                loaded = dist_checkpointing.load(self._request(group), self.ckpt_dir,
                                                 validate_access_integrity=False)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - name the dir whatever it is
            raise ConversionError(f"{self.ckpt_dir}: cannot read {group!r}: {_unwrap(err)}") from err
        layer = _LAYER_KEY.match(group) is not None
        return {name: v[0] if layer else v for name, v in loaded.items()}


def _checkpoint_dtype(ckpt_dir: Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    if not (ckpt_dir / "metadata.json").is_file():
        raise ConversionError(f"{ckpt_dir}: not a Megatron distributed checkpoint (no metadata.json)")
    tensors = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    key = MODEL_PREFIX + "embedding.word_embeddings.weight"
    if key not in tensors:
        raise ConversionError(f"{ckpt_dir}: no {key!r} in the checkpoint")
    return tensors[key].dtype


def convert_megatron_to_hf(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    model_cfg: ModelConfig | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Megatron distributed checkpoint -> HF Llama directory (safetensors, config, tokenizer).

    `dtype` ("float32" / "bfloat16" / "float16") defaults to the checkpoint's own dtype.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    model = model_cfg or read_model_config(ckpt_dir)
    cfg = _conversion_config(model, _checkpoint_dtype(ckpt_dir))
    out_dtype = getattr(torch, dtype) if dtype else getattr(torch, cfg.precision.params_dtype)
    base_path = ckpt_dir / HF_CONFIG_FILE
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    with staged_directory(out_dir, overwrite=overwrite) as staging:
        _require_world()
        reader = _LayerReader(ckpt_dir, _meta_layout(cfg), model.num_layers)
        items = [(n, s, out_dtype) for n, s in hf_tensor_shapes(cfg).items()]
        write_hf_weights(staging, items,
                         lambda n: megatron_to_hf_tensor(reader.get, cfg, n).to(out_dtype),
                         max_shard_bytes)
        atomic_write_json(staging / "config.json",
                          hf_config_from_model(cfg, DTYPE_NAMES[out_dtype], base=base))
        src = Path(tokenizer_dir) if tokenizer_dir else ckpt_dir / TOKENIZER_DIR
        copy_tokenizer_files(src, staging, TOKENIZER_FILES)
    return out_dir
