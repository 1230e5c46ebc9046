"""Degenerate outputs, said in words at the top of the report.

A run can finish every stage and still have trained on nothing worth the name: an EFT set with
no examples, a handful of preference pairs, a judge whose samples mostly failed to parse, a DPO
stage of one optimizer step. The numbers are in the tables further down; these checks put the
cases that make them meaningless where a reader looks first.
"""

from __future__ import annotations

from typing import Any

from megatron_selfreward.report.collect import RunData

# Preference pairs per iteration below which DPO has too little to learn from (the paper kept
# 3,964 and 6,942; 32 is two optimizer steps at the paper's global batch of 16).
MIN_PAIRS = 32
# Optimizer steps below which a training stage barely moved the model.
MIN_TRAIN_STEPS = 4
# Share of judge samples without a parseable score above which the judge's numbers are noise.
MAX_PARSE_FAILURE_RATE = 0.30


def _eft_warnings(data: RunData) -> list[str]:
    eft = next((s for s in data.stages if s.label == "seed/eft_train"), None)
    if eft is None:
        return []
    out, counts = [], eft.counts
    if counts.get("examples") == 0:
        out.append(f"build_eft wrote 0 EFT examples from {counts.get('ranked_prompts', '?')} ranked prompts: "
                    "M1 learned no judging from the seed (the judge's scores never ordered the "
                    "responses as the human ranks do)")
    samples = counts.get("judge_samples")
    failures = counts.get("parse_failures")
    failed = sum(failures.values()) if isinstance(failures, dict) else 0
    if samples and failed / samples > MAX_PARSE_FAILURE_RATE:
        out.append(f"build_eft: {failed} of {samples} judge samples had no parseable score "
                   f"({failed / samples:.0%} > {MAX_PARSE_FAILURE_RATE:.0%})")
    return out


def _iteration_warnings(data: RunData) -> list[str]:
    out = []
    for it in data.iterations:
        pairs = it.counts.get("pairs")
        if pairs is not None and pairs < MIN_PAIRS:
            out.append(f"iter{it.number}: only {pairs} preference pairs (fewer than {MIN_PAIRS}): "
                       "the DPO step after it has little to learn from")
        h = it.health or {}
        rate = h.get("sample_failure_rate")
        if rate is not None and rate > MAX_PARSE_FAILURE_RATE:
            out.append(f"iter{it.number}: {h['sample_failures']} of {h['num_samples']} judge samples had "
                       f"no parseable score ({rate:.0%} > {MAX_PARSE_FAILURE_RATE:.0%}), reasons "
                       f"{h.get('failure_reasons', {})}; they are excluded, not scored 0")
    return out


def _training_warnings(data: RunData) -> list[str]:
    return [f"{run.label}: {len(run.records)} optimizer step(s) (fewer than {MIN_TRAIN_STEPS}): "
            "the model barely moved" for run in data.training if len(run.records) < MIN_TRAIN_STEPS]


def degenerate_outputs(data: RunData) -> list[str]:
    """One sentence per degenerate stage output found in the run directory."""
    return _eft_warnings(data) + _iteration_warnings(data) + _training_warnings(data)


def precision_lines(data: RunData) -> list[str]:
    """The weight dtype(s) the run's stages ran with, from their manifests, and why."""
    seen: dict[tuple[str, str], list[str]] = {}
    for stage in data.stages:
        p: dict[str, Any] | None = stage.precision
        if p:
            seen.setdefault((str(p.get("params_dtype")), str(p.get("choice"))), []).append(stage.label)
    if len(seen) <= 1:
        return [f"{dtype} ({choice})" for dtype, choice in seen]
    return [f"{dtype} ({choice}): {', '.join(labels)}" for (dtype, choice), labels in seen.items()]
