"""Stages `prepare_seed` and `build_eft`: the run's copy of the seed and the EFT judge data.

prepare_seed: the seed (built-in, a user directory, or built from an Open Assistant export by
  the paper's rules when `data.oasst_export` is set) written into `seed/` as the run's own
  files: `ift.jsonl`, `ranked_train.jsonl` + `eft_eval.jsonl` (the ranked prompts split by a hash
  of their ids, `data.eft_eval_fraction` held out for reward-model metrics) and
  `eval_prompts.jsonl`. An empty or malformed seed fails here, naming file and line. An OASST
  seed takes the built-in eval prompts (OASST has no held-out instruction set) and reports its
  sizes against the paper's, in the manifest counts and the log.
build_eft (paper 2.2): the EFT judge model scores every response of every ranked train prompt
  once with the Figure 2 prompt (T 0.7 / top-p 0.9 - our default, the paper is silent); prompts
  whose scores order the responses as the humans did become judge-training examples, then no
  score may hold more than `data.eft_max_bucket_fraction` of them (`data.oasst.build_eft`).
  With `judge.force_score` a target whose judge never wrote a score is the judge's text
  continued after "Score: " (see stages/respond.py), so weak judges can still produce EFT data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from megatron_selfreward.config import Config
from megatron_selfreward.data.oasst import PAPER_SIZES, build_eft, describe_sizes, load_oasst_seed
from megatron_selfreward.data.seed import Seed, load_builtin_seed, load_seed_dir, split_ranked
from megatron_selfreward.generation.engine import GenerationRequest
from megatron_selfreward.io import read_records, write_jsonl
from megatron_selfreward.judging.prompt import render_judge_prompt
from megatron_selfreward.records import RankedPrompt
from megatron_selfreward.stages.respond import chat_ids, force_scores, judge_sampling_params


def run_prepare_seed(cfg: Config, outputs: dict[str, Path],
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    d = cfg.data
    skipped: dict[str, int] | None = None
    if d.oasst_export:
        # config validation refuses data.seed beside it, so the eval prompts are the built-in ones
        export = Path(d.oasst_export).expanduser()
        seed, skipped = load_oasst_seed(export, load_builtin_seed().eval_prompts)
    else:
        seed = load_builtin_seed() if d.seed == "builtin" else load_seed_dir(Path(d.seed).expanduser())
    train, held_out = split_ranked(seed.ranked, d.eft_eval_fraction, cfg.pipeline.seed)
    counts = _write_seed(outputs, seed, train, held_out)
    if skipped is not None:
        sizes = describe_sizes(len(seed.ift), ranked_train=len(train), eft_eval=len(held_out))
        log(f"      prepare_seed: OASST seed from {export}: {sizes}")
        counts.update({"source": "oasst", "oasst_export": str(export), "paper_sizes": PAPER_SIZES,
                       "oasst_skipped": skipped})
    return counts


def _write_seed(outputs: dict[str, Path], seed: Seed, train: list[RankedPrompt],
                held_out: list[RankedPrompt]) -> dict[str, Any]:
    # The main output (ift) last: a crash in between leaves the stage visibly unfinished.
    write_jsonl(outputs["ranked_train"], train)
    write_jsonl(outputs["eft_eval"], held_out)
    write_jsonl(outputs["eval_prompts"], seed.eval_prompts)
    write_jsonl(outputs["ift"], seed.ift)
    return {"ift": len(seed.ift), "ranked_train": len(train), "eft_eval": len(held_out),
            "eval_prompts": len(seed.eval_prompts)}


def run_build_eft(cfg: Config, ranked_path: Path, policy: Any, out: Path) -> dict[str, Any]:
    """EFT examples from the judge in `policy`; returns the manifest counts."""
    j, d = cfg.judge, cfg.data
    ranked = read_records(ranked_path, RankedPrompt)
    if d.eft_max_prompts:
        ranked = ranked[: d.eft_max_prompts]
    params = judge_sampling_params(cfg, policy.tokenizer, 1)
    requests: list[GenerationRequest] = []
    kept: list[RankedPrompt] = []
    for r in ranked:
        ids = [chat_ids(cfg, policy.tokenizer, render_judge_prompt(r.prompt, resp)) for resp in r.responses]
        if any(len(x) + j.max_new_tokens > cfg.model.max_seq_len for x in ids):
            continue  # counted below: a prompt is judged whole or not at all
        kept.append(r)
        requests += [GenerationRequest(f"eft-{r.prompt_id}-{i}", x, params) for i, x in enumerate(ids)]
    samples = {res.request_id: res.samples for res in policy.engine.generate(requests)} if requests else {}
    texts, forced = force_scores(cfg, policy.engine, policy.tokenizer, requests, samples)
    by_pair = {(r.prompt, resp): texts[f"eft-{r.prompt_id}-{i}"][0]
               for r in kept for i, resp in enumerate(r.responses)}
    examples, stats = build_eft(kept, lambda prompt, resp: by_pair[(prompt, resp)],
                                random.Random(cfg.pipeline.seed), d.eft_max_bucket_fraction)
    write_jsonl(out, examples)
    return {"ranked_prompts": len(ranked), "prompts_too_long": len(ranked) - len(kept),
            "judge_samples": len(requests), "forced_score_samples": forced, "examples": len(examples),
            **stats.to_dict()}
