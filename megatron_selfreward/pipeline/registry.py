"""Every stage a plan can list, by name: the one table of stage names and per-stage facts.

`STAGE_KINDS` holds each stage's rough cost (the local executor's ETA), whether a finished one is
skipped, whether its Slurm job gets the node's GPUs, and whether it is sharded over
generation workers. The plan names its `StageSpec`s from it,
`selfreward stage NAME` and `selfreward profile NAME` offer its names, and the local executor
registers one adapter per name (`@adapter` in `pipeline/local.py`), looked up with `adapter_for`.
This module imports nothing heavy, so the command line lists stages without loading torch.

Adding a stage: a `StageKind` here, its `StageSpec` in `schedule.py`, its adapter in `local.py`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StageKind:
    name: str
    cost: float  # rough relative cost on a CPU run, only for the ETA
    skip_when_done: bool = True  # False: always rerun (the report summarises whatever the run holds)
    uses_gpus: bool = False  # one Slurm task with the node's GPUs: a model in one process
    sharded: bool = False  # split over generation workers (ranks, MPI, array tasks), then gathered


STAGE_KINDS: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("prepare_seed", 0.1),
    StageKind("import_model", 1, uses_gpus=True),
    StageKind("train_sft_baseline", 6),
    StageKind("build_eft", 4, uses_gpus=True),
    StageKind("train_sft", 8),
    StageKind("generate_prompts", 2, uses_gpus=True),
    StageKind("sample_responses", 3, sharded=True),
    StageKind("judge_responses", 5, sharded=True),
    StageKind("build_pairs", 0.1),
    StageKind("train_dpo", 4),
    StageKind("evaluate", 5, uses_gpus=True),
    StageKind("report", 0.2, skip_when_done=False),
)}
STAGE_NAMES = tuple(STAGE_KINDS)
SHARDED_STAGES = frozenset(name for name, kind in STAGE_KINDS.items() if kind.sharded)

# name -> the executor's adapter (spec -> stage function); filled by `pipeline/local.py`.
_ADAPTERS: dict[str, Callable[..., Any]] = {}


def adapter(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the adapter of each stage in `names`."""
    unknown = [name for name in names if name not in STAGE_KINDS]
    if unknown:
        raise KeyError(f"no stage {', '.join(unknown)} in pipeline/registry.py's STAGE_KINDS")

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            _ADAPTERS[name] = func
        return func

    return register


def adapter_for(name: str) -> Callable[..., Any]:
    importlib.import_module("megatron_selfreward.pipeline.local")  # registers the adapters
    return _ADAPTERS[name]


def stage_cost(name: str) -> float:
    kind = STAGE_KINDS.get(name)
    return kind.cost if kind is not None else 1
