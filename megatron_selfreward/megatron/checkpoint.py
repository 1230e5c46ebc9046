"""Megatron distributed checkpoints: the model (save once, load at any TP/PP) and full training state.

Weights are saved through `megatron.core.dist_checkpointing` from the model's sharded state
dict, so a checkpoint written at one layout loads at another (resharding on load). A checkpoint
directory appears only when complete: ranks write into a hidden staging directory beside it and
rank 0 renames it (`megatron_selfreward.megatron.publish`).

A training checkpoint (`save_train_state`) adds, in the same directory: the optimizer state
(megatron's sharded optimizer state; the distributed optimizer in its `dp_reshardable` format,
the one that round-trips on CPU), `trainer_state.json` (step, scheduler, data position, the
Adam step) and one RNG file per rank. It still loads with `load_model` (weights only).
Saves and loads run with one intra-op thread (`serial_intra_op`: a multi-threaded one slows
every later op of the process about twofold on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_selfreward.megatron.parallel import process_rank, serial_intra_op
from megatron_selfreward.megatron.publish import staged_directory

MODEL_PREFIX = "model."
OPTIMIZER_KEY = "optimizer"
TRAINER_STATE = "trainer_state.json"
# The only distributed-optimizer format that saved and resumed exactly with megatron-core 0.16 on
# CPU; the default (fully_sharded_model_space) raises "flattened_range is not supported".
DIST_OPTIM_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def unwrap(model: Any) -> Any:
    """The GPTModel inside megatron's DDP (or Float16Module) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _atomic_dir(directory: str | Path):
    """All ranks write into one staging directory beside `directory`; rank 0 renames it into
    place once everyone is done (torch's checkpoint writer syncs its own files)."""
    return staged_directory(directory, overwrite=True, collective=True, sync_files=False)


def save_model(model: Any, directory: str | Path) -> Path:
    """Save this rank's model chunk into a distributed checkpoint (collective call)."""
    from megatron.core import dist_checkpointing

    with _atomic_dir(directory) as tmp:
        sharded = unwrap(model).sharded_state_dict(prefix=MODEL_PREFIX)
        with serial_intra_op():
            dist_checkpointing.save(sharded, tmp)
    return Path(directory)


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
    with torch.no_grad(), serial_intra_op():
        loaded = dist_checkpointing.load(sharded, path)
    state = {k[len(MODEL_PREFIX):]: v for k, v in loaded.items() if k.startswith(MODEL_PREFIX)}
    inner.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------
# Full training state: model + optimizer + scheduler + data position + RNG


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers inside megatron's (chained) optimizer wrappers."""
    wrappers = getattr(optimizer, "chained_optimizers", [optimizer])
    return [w.optimizer for w in wrappers if getattr(w, "optimizer", None) is not None]


def adam_step(optimizer: Any) -> int:
    """torch Adam's per-parameter step count (all parameters share it)."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


def _step_tensor(value: float, group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
    # torch's fused Adam wants `step` on the parameter's device, the loop version on the host.
    device = param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
    return torch.tensor(value, dtype=torch.float32, device=device)


def _restore_adam_step(optimizer: Any, step: int) -> None:
    # torch Adam keeps `step` per parameter; megatron's sharded format keeps one common value that
    # some load paths do not put back (the bias correction then drifts): set it explicitly.
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param)
                if state:
                    state["step"] = _step_tensor(float(step), group, param)


def _create_adam_state(optimizer: Any) -> None:
    """Allocate torch Adam's (lazily created) state so a checkpoint can be loaded into it.

    The distributed optimizer's state_dict() reads each parameter's `step`, which torch only
    creates at the first step; the loaded values replace these zeros.
    """
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = _step_tensor(0.0, group, param)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _optimizer_sharded(optimizer: Any, model_sharded: dict, is_loading: bool) -> Any:
    return optimizer.sharded_state_dict(model_sharded, is_loading=is_loading, metadata=DIST_OPTIM_FORMAT)


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state: dict[str, Any] = {"cpu": torch.get_rng_state(),
                             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_train_state(model_chunks: list[Any], optimizer: Any, directory: str | Path,
                     trainer_state: dict[str, Any]) -> Path:
    """Save model, optimizer, RNG states and `trainer_state` (JSON) atomically (collective call)."""
    from megatron.core import dist_checkpointing

    inner = unwrap(model_chunks[0])
    with _atomic_dir(directory) as tmp:
        sharded = inner.sharded_state_dict(prefix=MODEL_PREFIX)
        sharded[OPTIMIZER_KEY] = _optimizer_sharded(optimizer, sharded, is_loading=False)
        with serial_intra_op():
            dist_checkpointing.save(sharded, tmp)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{process_rank():05d}.pt")
        if process_rank() == 0:
            state = dict(trainer_state, adam_step=adam_step(optimizer))
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    return Path(directory)


def load_train_state(model_chunks: list[Any], optimizer: Any, directory: str | Path) -> dict[str, Any]:
    """Restore what `save_train_state` wrote (same layout); returns the saved `trainer_state`."""
    from megatron.core import dist_checkpointing

    path = Path(directory)
    inner = unwrap(model_chunks[0])
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    with torch.no_grad():
        sharded = inner.sharded_state_dict(prefix=MODEL_PREFIX)
        _create_adam_state(optimizer)
        sharded[OPTIMIZER_KEY] = _optimizer_sharded(optimizer, sharded, is_loading=True)
        with serial_intra_op():
            loaded = dist_checkpointing.load(sharded, path)
        weights = {k[len(MODEL_PREFIX):]: v for k, v in loaded.items() if k.startswith(MODEL_PREFIX)}
        inner.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(loaded[OPTIMIZER_KEY])
        _restore_adam_step(optimizer, int(trainer_state["adam_step"]))
    rng_file = path / "rng" / f"rank_{process_rank():05d}.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))  # our own file, tensors only
    return trainer_state


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete `step_N` checkpoint under `directory` (staging directories are hidden)."""
    root = Path(directory)
    best: tuple[int, Path] | None = None
    for child in root.glob("step_*") if root.is_dir() else []:
        suffix = child.name[len("step_"):]
        if suffix.isdigit() and (child / TRAINER_STATE).is_file():
            if best is None or int(suffix) > best[0]:
                best = (int(suffix), child)
    return best[1] if best else None
