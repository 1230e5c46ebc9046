"""`selfreward doctor`: can this machine run this config, and if not, why and what to do.

facts.py collects what the machine has (torch/CUDA/GPUs, megatron-core, Transformer Engine,
TensorRT-LLM, MPI, Slurm, apex, CPU), verdict.py decides from those facts alone which of the
config's features are enabled or blocked, render.py prints the result. Exit status 1 when any
feature is blocked, 0 otherwise.
"""

from __future__ import annotations

from typing import Any

from megatron_selfreward.doctor.facts import collect_facts
from megatron_selfreward.doctor.render import render_json, render_text
from megatron_selfreward.doctor.verdict import Check, runnable, verdict

__all__ = ["Check", "collect_facts", "doctor", "render_json", "render_text", "runnable", "verdict"]


def doctor(cfg: Any, config_label: str, as_json: bool = False) -> tuple[str, int]:
    """(report, exit status) for `cfg` on this machine."""
    facts = collect_facts(cfg)
    checks = verdict(cfg, facts)
    render = render_json if as_json else render_text
    return render(config_label, facts, checks), 0 if runnable(checks) else 1
