"""Stages `sample_responses`, `judge_responses` and `build_pairs` (paper section 4, steps 2-4).

sample:  N responses per prompt from the current model M_t (T 0.7, top-p 0.9).
judge:   the same M_t scores each response with the Figure 2 prompt, k samples each; parse
         failures are kept, counted and excluded from the mean (never scored 0).
pairs:   highest vs lowest mean score per prompt; ties and prompts with < 2 scored are dropped.

Sampling and judging run in resumable shards of `pipeline.shard_size` items (`stages/shards.py`):
a killed stage continues from its last finished shard and produces the same records. Outputs are
returned as streamed `Records` views: at paper scale (~200k responses, ~600k judge samples) a
list of every record would hold their texts in memory for nothing.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from megatron_selfreward.config import Config
from megatron_selfreward.generation.engine import Followup, GenerationRequest, SamplingParams, engine_rates
from megatron_selfreward.io import (
    RecordReader,
    Records,
    iter_records,
    iter_records_at,
    read_records,
    write_jsonl,
)
from megatron_selfreward.judging.preference_pairs import (
    NoPairReason,
    preference_pair,
    scores_in_response_order,
    select_pair_indices,
)
from megatron_selfreward.judging.parse import judgement_from_outputs, parse_score
from megatron_selfreward.judging.prompt import load_template, render_judge_prompt
from megatron_selfreward.records import Judgement, PreferencePair, Prompt, Response
from megatron_selfreward.stages.manifest import is_done, manifest_path, write_manifest
from megatron_selfreward.stages.shards import SINGLE, Workers, clear_shards, run_sharded, worker_stats
from megatron_selfreward.tokenizer import Tokenizer, render_chat


def chat_ids(cfg: Config, tokenizer: Tokenizer, user_text: str) -> list[int]:
    text = render_chat([{"role": "user", "content": user_text}], cfg.model.chat_template, True)
    return tokenizer.encode(text)


def _fits(cfg: Config, ids: list[int], max_new_tokens: int) -> bool:
    return len(ids) + max_new_tokens <= cfg.model.max_seq_len


def _texts(engine: Any, requests: list[GenerationRequest]) -> dict[str, list[Any]]:
    return {r.request_id: r.samples for r in engine.generate(requests)} if requests else {}


# Measured on SmolLM2-135M after its own verdict: a bare "Score: " is followed by 100 or 10
# (a percentage or /10) in 4 of 5 samples; naming the range first gets ~45% in range, spread out.
SCORE_CUE = "\nFinal score (an integer from 0 to 5)\nScore: "
FORCED_MAX_NEW_TOKENS = 4


def score_token_ids(tokenizer: Tokenizer, low: float, high: float) -> list[int] | None:
    """One token id per integer score in [low, high], or None when some score is not a single
    token of its own (then a forced score is sampled freely and may still fail to parse)."""
    ids = []
    for score in range(math.ceil(low), math.floor(high) + 1):
        tokens = tokenizer.encode(str(score))
        if len(tokens) != 1 or tokenizer.decode(tokens) != str(score):
            return None
        ids.append(tokens[0])
    return ids if len(set(ids)) == len(ids) else None


def _constrained(cfg: Config) -> bool:
    """Whether the engine draws from allowed_token_ids and continues samples in place (the
    Megatron engine); TensorRT-LLM gets the plain follow-up requests of force_scores."""
    return cfg.generation.engine == "megatron"


def forced_score_params(cfg: Config, tokenizer: Tokenizer) -> SamplingParams:
    """How a forced score is drawn: one token among the valid scores, from the judge's own
    distribution renormalised over them (the number stays the judge's choice, and a 135M judge's
    "10" or "100" after the cue becomes its preference among 0..5), else a few free tokens."""
    j = cfg.judge
    allowed = score_token_ids(tokenizer, j.score_low, j.score_high) if _constrained(cfg) else None
    if allowed:
        return SamplingParams(temperature=j.temperature, top_p=j.top_p, max_new_tokens=1,
                              allowed_token_ids=allowed)
    return SamplingParams(temperature=j.temperature, top_p=j.top_p, max_new_tokens=FORCED_MAX_NEW_TOKENS)


def judge_sampling_params(cfg: Config, tokenizer: Tokenizer, n: int) -> SamplingParams:
    """The judge's sampling (judge.temperature / top_p / max_new_tokens, n samples). With
    judge.force_score on the Megatron engine, a verdict without a parseable score is continued
    in place: the score cue and a forced score follow it in the same KV cache, so nothing is
    prefilled twice (force_scores then only collects them)."""
    j = cfg.judge
    followup = None
    if j.force_score and _constrained(cfg):
        forced = forced_score_params(cfg, tokenizer)
        followup = Followup(tuple(tokenizer.encode(SCORE_CUE)), forced.max_new_tokens,
                            tuple(forced.allowed_token_ids),
                            skip_if=lambda text: parse_score(text, j.score_low, j.score_high).ok)
    return SamplingParams(temperature=j.temperature, top_p=j.top_p, max_new_tokens=j.max_new_tokens, n=n,
                          followup=followup)


def force_scores(cfg: Config, engine: Any, tokenizer: Tokenizer, requests: Sequence[GenerationRequest],
                 samples: dict[str, list[Any]]) -> tuple[dict[str, list[str]], int]:
    """Judge texts per request id; with `judge.force_score`, each sample without a parseable
    score continues its own output after SCORE_CUE with a score drawn as `forced_score_params`
    says: in place when the engine did it (`judge_sampling_params`), else as a follow-up
    request re-reading the prompt and the verdict. Returns the texts and how many samples were
    continued."""
    j = cfg.judge
    texts = {rid: [s.text for s in outs] for rid, outs in samples.items()}
    if not j.force_score:
        return texts, 0
    in_place = sum(s.followup_at is not None for outs in samples.values() for s in outs)
    params = forced_score_params(cfg, tokenizer)
    cue = tokenizer.encode(SCORE_CUE)
    follow, where = [], []
    for req in requests:
        for i, sample in enumerate(samples.get(req.request_id, [])):
            if sample.followup_at is not None:
                continue  # continued in place by the engine
            if parse_score(sample.text, j.score_low, j.score_high).ok:
                continue
            # The end-of-turn token would tell the model its answer is over: continue before it.
            own = sample.token_ids[:-1] if sample.finish_reason == "eos" else sample.token_ids
            ids = list(req.prompt_token_ids) + list(own) + cue
            if len(ids) + params.max_new_tokens <= cfg.model.max_seq_len:
                follow.append(GenerationRequest(f"{req.request_id}-force{i}", ids, params))
                where.append((req.request_id, i))
    for (rid, i), result in zip(where, engine.generate(follow) if follow else []):
        texts[rid][i] = texts[rid][i] + SCORE_CUE + result.samples[0].text
    return texts, in_place + len(follow)


def _generated(engine: Any, entries: Sequence[tuple[Any, GenerationRequest | None]]
               ) -> list[tuple[Any, list[Any] | None]]:
    """(item, samples or None when the item had no request) for one shard."""
    samples = _texts(engine, [req for _, req in entries if req is not None])
    return [(item, samples[req.request_id] if req is not None else None) for item, req in entries]


def reset_engine_stats(engine: Any) -> None:
    """One engine serves several stages: each manifest counts only its own stage's work."""
    reset = getattr(engine, "reset_stats", None)
    if reset is not None:
        reset()


def merged_engine_stats(out: Path) -> dict[str, Any]:
    """The engine counters of every worker that computed shards of `out`, summed; rates are
    recomputed from the sums (per worker-second: the workers ran side by side)."""
    workers = worker_stats(out)
    total: dict[str, Any] = {}
    for entry in workers:
        for key, value in entry.get("stats", {}).items():
            if isinstance(value, (int, float)) and not key.endswith(("_fraction", "_per_s")):
                total[key] = total.get(key, 0) + value
    if workers:
        total.update(engine_rates(total))
        total["workers"] = max(int(e.get("workers", 1)) for e in workers)
        total["shards_computed"] = sum(int(e.get("shards_computed", 0)) for e in workers)
    return total


def _engine_stats(engine: Any) -> dict[str, Any]:
    return dict(getattr(engine, "stats", {}) or {})


def run_sample_responses(cfg: Config, engine: Any, tokenizer: Tokenizer, prompts_path: Path,
                         fp: dict[str, Any], out: Path,
                         workers: Workers = SINGLE) -> Records[Response] | None:
    """Sample N responses per prompt. With several `workers`, each computes its share of the
    shards; the gathering worker writes the output and manifest (others return None). `fp`: the
    stage's fingerprint (its spec's), in the manifest and every shard."""
    g = cfg.generation
    if is_done(out, fp):
        return Records(out, Response)
    started = time.time()
    reset_engine_stats(engine)
    prompts = read_records(prompts_path, Prompt)
    params = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                            max_new_tokens=g.max_new_tokens, n=g.responses_per_prompt)
    entries = []  # a prompt too long for the context gets no request: skipped and counted
    for p in prompts:
        ids = chat_ids(cfg, tokenizer, p.text)
        entries.append((p, GenerationRequest(p.prompt_id, ids, params)
                        if _fits(cfg, ids, g.max_new_tokens) else None))

    def process(shard: Sequence[tuple[Prompt, GenerationRequest | None]]) -> list[Response]:
        return [Response(prompt_id=p.prompt_id, response_id=f"{p.prompt_id}-r{i}", text=s.text.strip(),
                         num_tokens=len(s.token_ids), finish_reason=s.finish_reason)
                for p, outs in _generated(engine, shard) if outs is not None
                for i, s in enumerate(outs)]

    responses, reused = run_sharded(entries, cfg.pipeline.shard_size, out, fp, process, Response,
                                    workers=workers, stats=lambda: _engine_stats(engine),
                                    desc="sample_responses")
    if responses is None:
        return None
    engine_stats = merged_engine_stats(out)
    too_long = sum(req is None for _, req in entries)
    write_manifest(out, "sample_responses", fp,
                   {"prompts": len(prompts), "responses": len(responses), "prompts_too_long": too_long},
                   started, {"engine": engine_stats, "shards_reused": reused,
                             "workers": engine_stats.get("workers", workers.size)})
    clear_shards(out)
    return responses


def _unjudged(response: Response) -> Judgement:
    """A response whose judge prompt exceeds the context: counted as a failure, never scored."""
    return Judgement(prompt_id=response.prompt_id, response_id=response.response_id,
                     sample_scores=[None], raw_outputs=[""], failure_reasons=["prompt_too_long"],
                     mean_score=None)


def _was_too_long(judgement: Judgement) -> bool:
    """Written by `_unjudged` (no judge sample ran)."""
    return judgement.failure_reasons == ["prompt_too_long"] and judgement.raw_outputs == [""]


def run_judge_responses(cfg: Config, engine: Any, tokenizer: Tokenizer, prompts_path: Path,
                        responses_path: Path, fp: dict[str, Any], out: Path,
                        workers: Workers = SINGLE) -> Records[Judgement] | None:
    """Judge every response k times; sharded over `workers` like run_sample_responses."""
    j = cfg.judge
    if is_done(out, fp):
        return Records(out, Judgement)
    started = time.time()
    reset_engine_stats(engine)
    template = load_template(j.template or None)
    prompt_text = {p.prompt_id: p.text for p in read_records(prompts_path, Prompt)}
    responses = read_records(responses_path, Response)
    params = judge_sampling_params(cfg, tokenizer, j.samples_per_response)

    def request(r: Response) -> GenerationRequest | None:
        ids = chat_ids(cfg, tokenizer, render_judge_prompt(prompt_text[r.prompt_id], r.text, template))
        return GenerationRequest(r.response_id, ids, params) if _fits(cfg, ids, j.max_new_tokens) else None

    forced = 0

    def process(responses_of_shard: Sequence[Response]) -> list[Judgement]:
        # Judge prompts are tokenized per shard: all of them at once would hold ~2k token ids
        # per response (gigabytes of Python ints at 200k responses).
        nonlocal forced
        shard = [(r, request(r)) for r in responses_of_shard]
        requests = [req for _, req in shard if req is not None]
        texts, n = force_scores(cfg, engine, tokenizer, requests, _texts(engine, requests))
        forced += n
        return [judgement_from_outputs(r.prompt_id, r.response_id, texts[req.request_id],
                                       j.score_low, j.score_high)
                if req is not None else _unjudged(r)
                for r, req in shard]

    judgements, reused = run_sharded(responses, cfg.pipeline.shard_size, out, fp, process, Judgement,
                                     workers=workers, desc="judge_responses",
                                     stats=lambda: {**_engine_stats(engine), "forced_score_samples": forced})
    if judgements is None:
        return None
    engine_stats = merged_engine_stats(out)
    failures: Counter = Counter()
    judge_samples = too_long = 0
    for jd in judgements:  # one streamed pass over the gathered file
        judge_samples += len(jd.raw_outputs)
        failures.update(reason for reason in jd.failure_reasons if reason)
        too_long += _was_too_long(jd)
    write_manifest(out, "judge_responses", fp,
                   {"responses": len(responses), "judge_samples": judge_samples,
                    "parse_failures": dict(failures),
                    "too_long_to_judge": too_long,
                    # by the workers that computed shards now (shards_reused: earlier runs)
                    "forced_score_samples": int(engine_stats.pop("forced_score_samples", forced))},
                   started, {"engine": engine_stats, "shards_reused": reused,
                             "workers": engine_stats.get("workers", workers.size)})
    clear_shards(out)
    return judgements


def _streamed_pairs(prompts: Sequence[Prompt], responses_path: Path, judgements_path: Path,
                    dropped: Counter) -> Iterator[PreferencePair]:
    """`judging/preference_pairs.py`'s pair for each prompt, in prompt order, in memory that grows with the
    number of responses but not with their texts: one pass over the responses keeps their ids and
    where each line is, one over the judgements keeps the mean scores, and only the chosen and
    rejected responses are read back (in file order when responses come in prompt order)."""
    located: dict[str, list[tuple[str, int, int]]] = {}  # prompt id -> (response id, offset, line)
    for line_no, offset, r in iter_records_at(responses_path, Response):
        located.setdefault(r.prompt_id, []).append((r.response_id, offset, line_no))
    judged: dict[str, list[tuple[str, float | None]]] = {}
    for jd in iter_records(judgements_path, Judgement):
        judged.setdefault(jd.prompt_id, []).append((jd.response_id, jd.mean_score))
    with RecordReader(responses_path, Response) as reader:
        for p in prompts:
            candidates = located.get(p.prompt_id)
            if candidates is None:
                dropped["no_responses"] += 1
                continue
            scores = scores_in_response_order(p.prompt_id, [c[0] for c in candidates],
                                              judged.get(p.prompt_id, []))
            picked = select_pair_indices(scores)
            if isinstance(picked, NoPairReason):
                dropped[picked.value] += 1
                continue
            chosen_i, rejected_i = picked
            _, chosen_offset, chosen_line = candidates[chosen_i]
            _, rejected_offset, rejected_line = candidates[rejected_i]
            chosen, rejected = reader.at(chosen_offset, chosen_line), reader.at(rejected_offset, rejected_line)
            yield preference_pair(p, chosen, rejected, scores[chosen_i], scores[rejected_i])  # type: ignore[arg-type]


def run_build_pairs(prompts_path: Path, responses_path: Path, judgements_path: Path,
                    out: Path, fp: dict[str, Any]) -> Records[PreferencePair]:
    """Best-vs-worst pairs of one iteration into `out`; `fp`: the stage's fingerprint (its spec's)."""
    if is_done(out, fp):
        return Records(out, PreferencePair)
    started = time.time()
    prompts = read_records(prompts_path, Prompt)
    dropped: Counter = Counter()
    count = write_jsonl(out, _streamed_pairs(prompts, responses_path, judgements_path, dropped))
    write_manifest(out, "build_pairs", fp, {"prompts": len(prompts), "pairs": count,
                                            "dropped": dict(dropped)}, started)
    return Records(out, PreferencePair, count)


def pairs_summary(pairs: Sequence[PreferencePair], judgements_path: Path) -> dict[str, Any]:
    import json

    manifest = json.loads(manifest_path(judgements_path).read_text())
    return {"pairs": len(pairs), **manifest["counts"]}
