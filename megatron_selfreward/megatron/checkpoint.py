"""Megatron distributed checkpoints of the model: save once, load at any TP/PP.

Weights are saved through `megatron.core.dist_checkpointing` from the model's sharded state
dict, so a checkpoint written at one layout loads at another (resharding on load). A checkpoint
directory appears only when complete: ranks write into `<dir>.tmp` and rank 0 renames it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

MODEL_PREFIX = "model."


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def unwrap(model: Any) -> Any:
    """The GPTModel inside megatron's DDP (or Float16Module) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save_model(model: Any, directory: str | Path) -> Path:
    """Save this rank's model chunk into a distributed checkpoint (collective call)."""
    from megatron.core import dist_checkpointing

    target = Path(directory)
    tmp = target.with_name(target.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    sharded = unwrap(model).sharded_state_dict(prefix=MODEL_PREFIX)
    dist_checkpointing.save(sharded, tmp)
    _barrier()
    if _rank() == 0:
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    _barrier()
    return target


def load_model(model: Any, directory: str | Path) -> None:
    """Load weights into this rank's chunk, whatever TP/PP the checkpoint was saved with."""
    from megatron.core import dist_checkpointing

    path = Path(directory)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Megatron distributed checkpoint (no metadata.json); "
            "convert Hugging Face weights with `selfreward convert hf-to-megatron` first"
        )
    inner = unwrap(model)
    sharded = inner.sharded_state_dict(prefix=MODEL_PREFIX)
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, path)
    state = {k[len(MODEL_PREFIX):]: v for k, v in loaded.items() if k.startswith(MODEL_PREFIX)}
    inner.load_state_dict(state, strict=False)
