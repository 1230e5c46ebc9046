"""The config values each stage's output depends on: the `params` of its `StageSpec`.

A stage's fingerprint (`schedule.spec_fingerprint`) is the content of its inputs plus these values;
a change to any of them reruns the stage. They live beside the plan, not in the stages: the plan
decides when a stage is done, and a stage that writes its own manifest gets the fingerprint from
its spec (the executor passes it in).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config
from megatron_selfreward.stages.manifest import listing_digest


def import_params(cfg: Config) -> tuple[Path | None, dict[str, Path], dict[str, Any]]:
    """(source, fingerprint inputs, params) of `import_model`. A source file is an input (hashed by
    content); a source directory counts by its file listing, not by hashing gigabytes of weights,
    so a file changed at the same path is imported again, not silently reused."""
    # The user's model path as the import stage checks it (`model.path`, builtin:smollm2).
    from megatron_selfreward.assets import resolve_model_path

    m = cfg.model
    source = resolve_model_path(m.path) if m.source != "random" else None
    inputs = {"source": source} if source and source.is_file() else {}
    params: dict[str, Any] = {"source": m.source, "path": str(source or ""), "seed": cfg.pipeline.seed}
    if source is not None and source.is_dir():
        params["source_listing"] = listing_digest(source)
    return source, inputs, params


def optim_params(cfg: Config, section: str) -> dict[str, Any]:
    """A training stage (`sft` or `dpo` section)."""
    opt = getattr(cfg, section)
    return {**dataclasses.asdict(opt), "dropout": [cfg.model.hidden_dropout, cfg.model.attention_dropout],
            "parallel": dataclasses.asdict(cfg.parallel), "dtype": cfg.precision.params_dtype}


def prompt_params(cfg: Config) -> dict[str, Any]:
    return {**dataclasses.asdict(cfg.generation.prompts), "seed": cfg.pipeline.seed,
            "dtype": cfg.precision.params_dtype}


def sampling_params(cfg: Config) -> dict[str, Any]:
    """`sample_responses`."""
    g = cfg.generation
    return {"n": g.responses_per_prompt, "temperature": g.temperature, "top_p": g.top_p,
            "top_k": g.top_k, "max_new_tokens": g.max_new_tokens, "seed": cfg.pipeline.seed,
            "dtype": cfg.precision.params_dtype}


def judge_params(cfg: Config) -> dict[str, Any]:
    """`judge_responses` (and `build_eft`, which judges with k = 1)."""
    j = cfg.judge
    return {"k": j.samples_per_response, "temperature": j.temperature, "top_p": j.top_p,
            "max_new_tokens": j.max_new_tokens, "template": j.template, "seed": cfg.pipeline.seed,
            "force_score": j.force_score, "dtype": cfg.precision.params_dtype}


def answer_params(cfg: Config) -> dict[str, Any]:
    """How `evaluate` has each model answer the held-out prompts (the stage samples with them)."""
    e = cfg.eval
    return {"temperature": e.answer_temperature, "top_p": e.answer_top_p,
            "max_new_tokens": e.answer_max_new_tokens or cfg.generation.max_new_tokens,
            "seed": cfg.pipeline.seed, "chat_template": cfg.model.chat_template,
            "dtype": cfg.precision.params_dtype}


def evaluate_params(cfg: Config) -> dict[str, Any]:
    """`evaluate` (metrics.json)."""
    e, j = cfg.eval, cfg.judge
    return {"rm_samples": e.rm_samples, "judge_temperature": j.temperature, "judge_top_p": j.top_p,
            "judge_max_new_tokens": j.max_new_tokens, "judge_template": j.template,
            "score_range": [j.score_low, j.score_high], "force_score": j.force_score,
            "head_to_head_prompts": e.head_to_head_prompts,
            "answers": answer_params(cfg), "pairwise_judge": e.judge, "pairwise_judge_model": e.judge_model,
            "pairwise_max_new_tokens": e.judge_max_new_tokens, "seed": cfg.pipeline.seed,
            "dtype": cfg.precision.params_dtype}
