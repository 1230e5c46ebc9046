"""Stages `sample_responses`, `judge_responses` and `build_pairs` (paper section 4, steps 2-4).

sample:  N responses per prompt from the current model M_t (T 0.7, top-p 0.9).
judge:   the same M_t scores each response with the Figure 2 prompt, k samples each; parse
         failures are kept, counted and excluded from the mean (never scored 0).
pairs:   highest vs lowest mean score per prompt; ties and prompts with < 2 scored are dropped.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from megatron_selfreward.config import Config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
from megatron_selfreward.io import read_records, write_jsonl
from megatron_selfreward.judging.pairs import build_pair
from megatron_selfreward.judging.parse import judgement_from_outputs
from megatron_selfreward.judging.prompt import load_template, render_judge_prompt
from megatron_selfreward.records import Judgement, PreferencePair, Prompt, Response
from megatron_selfreward.stages.manifest import fingerprint, is_done, manifest_path, write_manifest
from megatron_selfreward.tokenizer import Tokenizer, render_chat


def chat_ids(cfg: Config, tokenizer: Tokenizer, user_text: str) -> list[int]:
    text = render_chat([{"role": "user", "content": user_text}], cfg.model.chat_template, True)
    return tokenizer.encode(text)


def _fits(cfg: Config, ids: list[int], max_new_tokens: int) -> bool:
    return len(ids) + max_new_tokens <= cfg.model.max_seq_len


def _texts(engine: Any, requests: list[GenerationRequest]) -> dict[str, list[Any]]:
    return {r.request_id: r.samples for r in engine.generate(requests)} if requests else {}


def run_sample_responses(cfg: Config, engine: Any, tokenizer: Tokenizer, prompts_path: Path,
                         model_manifest: Path, out: Path) -> list[Response]:
    g = cfg.generation
    fp = fingerprint({"prompts": prompts_path, "model": model_manifest},
                     {"n": g.responses_per_prompt, "temperature": g.temperature, "top_p": g.top_p,
                      "top_k": g.top_k, "max_new_tokens": g.max_new_tokens, "seed": cfg.pipeline.seed})
    if is_done(out, fp):
        return read_records(out, Response)
    started = time.time()
    prompts = read_records(prompts_path, Prompt)
    params = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                            max_new_tokens=g.max_new_tokens, n=g.responses_per_prompt)
    requests, too_long = [], 0
    for p in prompts:
        ids = chat_ids(cfg, tokenizer, p.text)
        if not _fits(cfg, ids, g.max_new_tokens):
            too_long += 1
            continue
        requests.append(GenerationRequest(p.prompt_id, ids, params))
    samples = _texts(engine, requests)
    responses = [
        Response(prompt_id=pid, response_id=f"{pid}-r{i}", text=s.text.strip(),
                 num_tokens=len(s.token_ids), finish_reason=s.finish_reason)
        for pid, outs in samples.items() for i, s in enumerate(outs)
    ]
    write_jsonl(out, responses)
    write_manifest(out, "sample_responses", fp,
                   {"prompts": len(prompts), "responses": len(responses), "prompts_too_long": too_long},
                   started, {"engine": dict(engine.stats)})
    return responses


def _unjudged(response: Response) -> Judgement:
    """A response whose judge prompt exceeds the context: counted as a failure, never scored."""
    return Judgement(prompt_id=response.prompt_id, response_id=response.response_id,
                     sample_scores=[None], raw_outputs=[""], failure_reasons=["prompt_too_long"],
                     mean_score=None)


def run_judge_responses(cfg: Config, engine: Any, tokenizer: Tokenizer, prompts_path: Path,
                        responses_path: Path, model_manifest: Path, out: Path) -> list[Judgement]:
    j = cfg.judge
    fp = fingerprint({"prompts": prompts_path, "responses": responses_path, "model": model_manifest},
                     {"k": j.samples_per_response, "temperature": j.temperature, "top_p": j.top_p,
                      "max_new_tokens": j.max_new_tokens, "template": j.template,
                      "seed": cfg.pipeline.seed})
    if is_done(out, fp):
        return read_records(out, Judgement)
    started = time.time()
    template = load_template(j.template or None)
    prompt_text = {p.prompt_id: p.text for p in read_records(prompts_path, Prompt)}
    responses = read_records(responses_path, Response)
    params = SamplingParams(temperature=j.temperature, top_p=j.top_p,
                            max_new_tokens=j.max_new_tokens, n=j.samples_per_response)
    requests, too_long = [], []
    for r in responses:
        ids = chat_ids(cfg, tokenizer, render_judge_prompt(prompt_text[r.prompt_id], r.text, template))
        if _fits(cfg, ids, j.max_new_tokens):
            requests.append(GenerationRequest(r.response_id, ids, params))
        else:
            too_long.append(r.response_id)
    samples = _texts(engine, requests)
    judgements = [
        judgement_from_outputs(r.prompt_id, r.response_id, [s.text for s in samples[r.response_id]],
                               j.score_low, j.score_high)
        if r.response_id in samples else _unjudged(r)
        for r in responses
    ]
    write_jsonl(out, judgements)
    failures = Counter(reason for jd in judgements for reason in jd.failure_reasons if reason)
    write_manifest(out, "judge_responses", fp,
                   {"responses": len(responses), "judge_samples": sum(len(jd.raw_outputs) for jd in judgements),
                    "parse_failures": dict(failures), "too_long_to_judge": len(too_long)},
                   started, {"engine": dict(engine.stats)})
    return judgements


def run_build_pairs(prompts_path: Path, responses_path: Path, judgements_path: Path,
                    out: Path) -> list[PreferencePair]:
    fp = fingerprint({"prompts": prompts_path, "responses": responses_path,
                      "judgements": judgements_path}, {})
    if is_done(out, fp):
        return read_records(out, PreferencePair)
    started = time.time()
    prompts = read_records(prompts_path, Prompt)
    by_prompt: dict[str, list[Response]] = {}
    for r in read_records(responses_path, Response):
        by_prompt.setdefault(r.prompt_id, []).append(r)
    judged: dict[str, list[Judgement]] = {}
    for jd in read_records(judgements_path, Judgement):
        judged.setdefault(jd.prompt_id, []).append(jd)
    pairs, dropped = [], Counter()
    for p in prompts:
        if p.prompt_id not in by_prompt:
            dropped["no_responses"] += 1
            continue
        pair, reason = build_pair(p, by_prompt[p.prompt_id], judged.get(p.prompt_id, []))
        if pair is None:
            dropped[str(getattr(reason, "value", reason))] += 1
        else:
            pairs.append(pair)
    write_jsonl(out, pairs)
    write_manifest(out, "build_pairs", fp, {"prompts": len(prompts), "pairs": len(pairs),
                                            "dropped": dict(dropped)}, started)
    return pairs


def pairs_summary(pairs: Sequence[PreferencePair], judgements_path: Path) -> dict[str, Any]:
    import json

    manifest = json.loads(manifest_path(judgements_path).read_text())
    return {"pairs": len(pairs), **manifest["counts"]}
