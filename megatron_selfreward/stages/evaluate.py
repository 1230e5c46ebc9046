"""Stage `evaluate`: how good is M_t as a judge and as a policy (paper section 6).

`run_evaluate(cfg, evaluation, fp, models)` writes `eval/M<t>/metrics.json` (every path as the
plan's `evaluate` spec names it, see `Evaluation`) with
(a) the reward-model metrics of Table 4: M_t judges every human-ranked response of the held-out
    EFT eval split with the Figure 2 prompt, `eval.rm_samples` samples each; both the
    first-sample and the k-sample-mean variants are reported (policies in `judging/metrics.py`);
(b) judge health of the self-judgements of iterations t-1 (those built M_t's training pairs)
    and t (M_t judging), whichever exist at evaluation time;
(c) head-to-head of M_t against M_{t-1} on held-out prompts: both answer (greedy unless
    `eval.answer_temperature` > 0, seeds fixed), a judge compares each pair in both orders with
    the pairwise prompt, disagreement = tie, an unparsed verdict = "unjudged". The judge is M_t
    itself, another model directory, or an OpenAI-compatible endpoint (`eval.judge`);
(d) answer lengths of both models.

Intermediate files are stages of their own with manifests, so a rerun redoes only what changed
and every verdict can be read: `eval/answers/<model>.jsonl` (reused by the next evaluation, where
this model is the previous one), `eval/M<t>/rm_judgements.jsonl`, `eval/M<t>/head_to_head.jsonl`.
Models come from the executor's cache (`pipeline/local.py::ModelCache`, in the process world the
executor opened): at most one is in memory at a time, each freed before the next loads, and a
fully cached evaluation loads none.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

from megatron_selfreward.config import Config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
from megatron_selfreward.io import atomic_write_json, iter_records, read_records, write_jsonl
from megatron_selfreward.judging.metrics import judge_health, reward_model_metrics
from megatron_selfreward.judging.openai_client import JudgeEndpointError, OpenAICompatibleClient
from megatron_selfreward.judging.head_to_head import (
    PairwiseVerdict,
    combine_both_orders,
    parse_pairwise_verdict,
    render_pairwise_prompt,
    summarize_outcomes,
)
from megatron_selfreward.judging.parse import judgement_from_outputs
from megatron_selfreward.judging.prompt import load_template, render_judge_prompt
from megatron_selfreward.records import Judgement, PreferencePair, Prompt, RankedPrompt, Response
from megatron_selfreward.stages.manifest import fingerprint, is_done, manifest_path, write_manifest
from megatron_selfreward.stages.respond import SCORE_CUE, force_scores, judge_sampling_params

__all__ = [
    "SCHEMA_VERSION",
    "RM_POLICY",
    "Evaluation",
    "derive_inputs",
    "eval_split",
    "head_to_head_prompts",
    "reward_model_section",
    "judge_health_section",
    "lengths_section",
    "run_evaluate",
]

SCHEMA_VERSION = 1
PROMPT_TOO_LONG = "prompt_too_long"
ENDPOINT_ERROR = "endpoint_error"
RM_POLICY = (
    "pairwise accuracy pooled over response pairs, a model tie counts as wrong, pairs with a "
    "failed score are left out and counted; 5-best = share of responses scored 5 that are the "
    "human's best; exact match needs a strict, complete order (ties or failures = not exact); "
    "Spearman and Kendall tau-b per instruction against human quality, averaged over "
    "instructions where defined. single_sample uses each response's first judge sample, "
    "k_sample_mean the mean of its parsed samples."
)

# (request id, prompt text) -> id -> (output text or None, failure reason or None)
JudgeOutputs = dict[str, tuple[str | None, str | None]]


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Evaluation:
    """One evaluation as the plan names it (`pipeline/schedule.py::_evaluate_spec`): the executor
    builds it from the spec, this module decides no path of its own."""
    iteration: int  # the index t of M_t
    model: Path
    prev_model: Path | None
    eft_eval: Path  # held-out human-ranked prompts (the run's seed/eft_eval.jsonl)
    eval_prompts: Path  # head-to-head instructions (seed/eval_prompts.jsonl or the AlpacaEval cache)
    metrics: Path  # rm_judgements.jsonl and head_to_head.jsonl are written beside it
    answers_dir: Path  # <model>.jsonl: one model's answers, reused by the next evaluation
    derived_eft_eval: Path  # where `derive_inputs` writes the split when eft_eval is absent
    derived_eval_prompts: Path  # ... and the seed's eval prompts when eval_prompts is absent
    run_dir: Path  # metrics.json names its files relative to it; judge health reads its iter<n>/
    answer_params: dict[str, Any]  # how each model answers (the spec's params["answers"])


class Models(Protocol):
    """The executor's one-policy cache (`pipeline/local.py::ModelCache`)."""

    policy: Any  # the loaded policy, or None

    def get(self, model_dir: Path) -> Any: ...


def _model_input(model_dir: Path) -> Path:
    """A model counts by its manifest (how it was made), not by hashing gigabytes of weights."""
    manifest = manifest_path(model_dir)
    return manifest if manifest.is_file() else model_dir


def _load_seed(cfg: Config) -> Any:
    from megatron_selfreward.data.seed import load_builtin_seed, load_seed_dir

    return load_builtin_seed() if cfg.data.seed == "builtin" else load_seed_dir(Path(cfg.data.seed))


def eval_split(cfg: Config, prepared: Path, derived: Path) -> Path:
    """The held-out ranked prompts: `prepared` (seed/eft_eval.jsonl) when the run prepared its
    seed, else the same split made from the config (`data.eft_eval_fraction`, pipeline seed),
    written to `derived`."""
    if prepared.is_file():
        return prepared
    from megatron_selfreward.data.seed import split_ranked

    _, held_out = split_ranked(_load_seed(cfg).ranked, cfg.data.eft_eval_fraction, cfg.pipeline.seed)
    write_jsonl(derived, held_out)
    return derived


def head_to_head_prompts(cfg: Config, prepared: Path, derived: Path) -> Path:
    """Held-out instructions: the AlpacaEval set when `data.eval_prompts` asks for it (`prepared`
    is then its cache file), else the seed's: `prepared` when the run prepared its seed, else
    written to `derived`."""
    if cfg.data.eval_prompts == "alpaca_eval":
        from megatron_selfreward.data.alpaca_eval import load_alpaca_eval

        load_alpaca_eval(prepared.parent)  # downloads once into `prepared`, then reads it
        return prepared
    if prepared.is_file():
        return prepared
    write_jsonl(derived, _load_seed(cfg).eval_prompts)
    return derived


def derive_inputs(cfg: Config, evaluation: Evaluation) -> Evaluation:
    """`evaluation` reading the held-out split and prompts where they are (or were written now:
    see `eval_split`, `head_to_head_prompts`); the executor fingerprints these files."""
    ev = evaluation
    return replace(ev, eft_eval=eval_split(cfg, ev.eft_eval, ev.derived_eft_eval),
                   eval_prompts=head_to_head_prompts(cfg, ev.eval_prompts, ev.derived_eval_prompts))


# ---------------------------------------------------------------------------------------------
# Models and judges


def _generate(cfg: Config, policy: Any, prompts: Sequence[tuple[str, str]],
              params: SamplingParams) -> tuple[dict[str, list[Any]], list[str]]:
    """Samples per request id for prompts that fit the context; the ids that did not fit."""
    requests, too_long = _requests(cfg, policy, prompts, params)
    results = policy.engine.generate(requests) if requests else []
    return {r.request_id: r.samples for r in results}, too_long


def _requests(cfg: Config, policy: Any, prompts: Sequence[tuple[str, str]],
              params: SamplingParams) -> tuple[list[GenerationRequest], list[str]]:
    """Chat-formatted requests for prompts that fit the context; the ids that did not fit."""
    from megatron_selfreward.stages.respond import chat_ids

    requests, too_long = [], []
    for request_id, text in prompts:
        ids = chat_ids(cfg, policy.tokenizer, text)
        if len(ids) + params.max_new_tokens <= cfg.model.max_seq_len:
            requests.append(GenerationRequest(request_id, ids, params))
        else:
            too_long.append(request_id)
    return requests, too_long


def _engine_stats(policy: Any) -> dict[str, Any]:
    return dict(policy.engine.stats) if policy is not None else {}


def _reset_stats(policy: Any) -> None:
    from megatron_selfreward.stages.respond import reset_engine_stats

    reset_engine_stats(policy.engine)


class _ModelJudge:
    """A local model answering pairwise prompts greedily (M_t itself or another model dir)."""

    def __init__(self, cfg: Config, models: Models, model_dir: Path) -> None:
        self.cfg, self.models, self.model_dir = cfg, models, model_dir

    def __call__(self, prompts: Sequence[tuple[str, str]]) -> JudgeOutputs:
        policy = self.models.get(self.model_dir)
        _reset_stats(policy)
        params = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.eval.judge_max_new_tokens)
        samples, too_long = _generate(self.cfg, policy, prompts, params)
        out: JudgeOutputs = {rid: (s[0].text, None) for rid, s in samples.items()}
        out.update({rid: (None, PROMPT_TOO_LONG) for rid in too_long})
        return out

    def stats(self) -> dict[str, Any]:
        return _engine_stats(self.models.policy)


class _EndpointJudge:
    """An OpenAI-compatible endpoint; a request that still fails after retries is "unjudged",
    but an endpoint that answers nothing at all fails the stage (it is down or misconfigured)."""

    def __init__(self, cfg: Config) -> None:
        e = cfg.eval
        self.cfg = cfg
        self.client = OpenAICompatibleClient(e.judge, e.judge_model, api_key_env=e.judge_api_key_env,
                                             timeout_s=e.judge_timeout_s, max_retries=e.judge_max_retries)

    def _one(self, text: str) -> tuple[str | None, str | None]:
        try:
            reply = self.client.chat([{"role": "user", "content": text}], temperature=0.0,
                                     max_tokens=self.cfg.eval.judge_max_new_tokens,
                                     seed=self.cfg.pipeline.seed)
            return reply, None
        except JudgeEndpointError as err:
            return None, f"{ENDPOINT_ERROR}: {err}"

    def __call__(self, prompts: Sequence[tuple[str, str]]) -> JudgeOutputs:
        with ThreadPoolExecutor(max_workers=self.cfg.eval.judge_parallel_requests) as pool:
            replies = list(pool.map(self._one, [text for _, text in prompts]))
        if prompts and all(text is None for text, _ in replies):
            raise JudgeEndpointError(f"every head-to-head request failed; first: {replies[0][1]}")
        return {rid: reply for (rid, _), reply in zip(prompts, replies)}

    def stats(self) -> dict[str, Any]:
        return {}


def _make_judge(cfg: Config, models: Models, model_dir: Path) -> Any:
    choice = cfg.eval.judge
    if choice.startswith(("http://", "https://")):
        return _EndpointJudge(cfg)
    if choice == "self":
        return _ModelJudge(cfg, models, model_dir)
    judge_dir = Path(choice).expanduser()
    if not judge_dir.is_dir():
        raise FileNotFoundError(f"config key 'eval.judge': {judge_dir} is not a model directory "
                                "(use 'self', a dir with megatron/ or hf/, or an http(s)://.../v1 URL)")
    return _ModelJudge(cfg, models, judge_dir)


def _judge_label(cfg: Config, model_name: str) -> str:
    e = cfg.eval
    if e.judge == "self":
        return f"self ({model_name})"
    return f"{e.judge} ({e.judge_model})" if e.judge.startswith(("http://", "https://")) else e.judge


# ---------------------------------------------------------------------------------------------
# Sub-stages: each a file with a manifest, recomputed only when its inputs change


def _answers(cfg: Config, ev: Evaluation, models: Models, model_dir: Path) -> tuple[Path, list[Response]]:
    """One answer per held-out prompt from `model_dir`, shared by every evaluation that needs it."""
    out, prompts_path = ev.answers_dir / f"{model_dir.name}.jsonl", ev.eval_prompts
    a = ev.answer_params
    fp = fingerprint({"model": _model_input(model_dir), "prompts": prompts_path},
                     {**a, "limit": cfg.eval.head_to_head_prompts})
    if is_done(out, fp):
        return out, read_records(out, Response)
    started = time.time()
    prompts = read_records(prompts_path, Prompt)[: cfg.eval.head_to_head_prompts]
    policy = models.get(model_dir)
    _reset_stats(policy)
    params = SamplingParams(temperature=a["temperature"], top_p=a["top_p"], max_new_tokens=a["max_new_tokens"])
    samples, too_long = _generate(cfg, policy, [(p.prompt_id, p.text) for p in prompts], params)
    answers = [
        Response(prompt_id=p.prompt_id, response_id=f"{p.prompt_id}-{model_dir.name}",
                 text=samples[p.prompt_id][0].text.strip(), num_tokens=len(samples[p.prompt_id][0].token_ids),
                 finish_reason=samples[p.prompt_id][0].finish_reason, meta={"model": model_dir.name})
        for p in prompts if p.prompt_id in samples
    ]
    write_jsonl(out, answers)
    write_manifest(out, "evaluate_answers", fp,
                   {"prompts": len(prompts), "answers": len(answers), "prompts_too_long": len(too_long)},
                   started, {"model": model_dir.name, "engine": _engine_stats(policy)})
    return out, answers


def _unjudged(prompt_id: str, response_id: str, k: int) -> Judgement:
    return Judgement(prompt_id=prompt_id, response_id=response_id, sample_scores=[None] * k,
                     raw_outputs=[""] * k, failure_reasons=[PROMPT_TOO_LONG] * k, mean_score=None)


def _rm_judgements(cfg: Config, out_dir: Path, models: Models, model_dir: Path,
                   split_path: Path) -> tuple[Path, list[Judgement]]:
    """M_t scores every human-ranked response of the eval split, k samples each (Figure 2 prompt).

    Judged exactly as `judge_responses` judges: with `judge.force_score`, a sample without a
    parseable score is continued after the score cue (`respond.force_scores`), so the metrics
    describe the judge the loop actually uses."""
    out = out_dir / "rm_judgements.jsonl"
    j, k = cfg.judge, cfg.eval.rm_samples
    fp = fingerprint({"model": _model_input(model_dir), "eft_eval": split_path},
                     {"k": k, "temperature": j.temperature, "top_p": j.top_p, "max_new_tokens": j.max_new_tokens,
                      "template": j.template, "score_range": [j.score_low, j.score_high],
                      "seed": cfg.pipeline.seed, "force_score": j.force_score,
                      "dtype": cfg.precision.params_dtype})
    if is_done(out, fp):
        return out, read_records(out, Judgement)
    started = time.time()
    template = load_template(j.template or None)
    items = [(f"{r.prompt_id}-h{i}", r.prompt_id, render_judge_prompt(r.prompt, text, template))
             for r in read_records(split_path, RankedPrompt) for i, text in enumerate(r.responses)]
    policy = models.get(model_dir)
    _reset_stats(policy)
    params = judge_sampling_params(cfg, policy.tokenizer, k)
    requests, too_long = _requests(cfg, policy, [(rid, text) for rid, _, text in items], params)
    samples = {r.request_id: r.samples for r in policy.engine.generate(requests)} if requests else {}
    texts, forced = force_scores(cfg, policy.engine, policy.tokenizer, requests, samples)
    judgements = [
        judgement_from_outputs(pid, rid, texts[rid], j.score_low, j.score_high)
        if rid in texts else _unjudged(pid, rid, k)
        for rid, pid, _ in items
    ]
    write_jsonl(out, judgements)
    failures = Counter(reason for jd in judgements for reason in jd.failure_reasons if reason)
    write_manifest(out, "evaluate_rm_judgements", fp,
                   {"responses": len(items), "judge_samples": k * len(items), "parse_failures": dict(failures),
                    "too_long_to_judge": len(too_long), "forced_score_samples": forced},
                   started, {"model": model_dir.name, "engine": _engine_stats(policy)})
    return out, judgements


def _verdict(output: tuple[str | None, str | None]) -> PairwiseVerdict:
    text, failure = output
    return PairwiseVerdict(None, failure) if failure else parse_pairwise_verdict(text)


def _comparison_requests(prompts_path: Path, candidate: Sequence[Response],
                         baseline: Sequence[Response]) -> list[tuple[str, str, str]]:
    """(prompt id, candidate-first prompt, candidate-second prompt) for prompts both answered."""
    cand = {r.prompt_id: r.text for r in candidate}
    base = {r.prompt_id: r.text for r in baseline}
    return [(p.prompt_id, render_pairwise_prompt(p.text, cand[p.prompt_id], base[p.prompt_id]),
             render_pairwise_prompt(p.text, base[p.prompt_id], cand[p.prompt_id]))
            for p in read_records(prompts_path, Prompt) if p.prompt_id in cand and p.prompt_id in base]


def _head_to_head(cfg: Config, out_dir: Path, judge: Any, judge_fp: dict[str, Path],
                  prompts_path: Path, candidate: tuple[str, Path, list[Response]],
                  baseline: tuple[str, Path, list[Response]]) -> tuple[Path, list[dict]]:
    """Each prompt judged with the candidate shown first, then second; one row per prompt."""
    out = out_dir / "head_to_head.jsonl"
    fp = fingerprint({"prompts": prompts_path, "candidate_answers": candidate[1],
                      "baseline_answers": baseline[1], **judge_fp},
                     {"judge": cfg.eval.judge, "judge_model": cfg.eval.judge_model,
                      "max_new_tokens": cfg.eval.judge_max_new_tokens, "seed": cfg.pipeline.seed,
                      "dtype": cfg.precision.params_dtype})
    if is_done(out, fp):
        from megatron_selfreward.io import read_jsonl

        return out, read_jsonl(out)
    started = time.time()
    requests = _comparison_requests(prompts_path, candidate[2], baseline[2])
    flat = [(f"{pid}/first", first) for pid, first, _ in requests]
    flat += [(f"{pid}/second", second) for pid, _, second in requests]
    outputs = judge(flat)
    rows = []
    for pid, _, _ in requests:
        first, second = outputs[f"{pid}/first"], outputs[f"{pid}/second"]
        v1, v2 = _verdict(first), _verdict(second)
        rows.append({"prompt_id": pid, "candidate": candidate[0], "baseline": baseline[0],
                     "raw_candidate_first": first[0], "raw_candidate_second": second[0],
                     "choice_candidate_first": v1.choice, "choice_candidate_second": v2.choice,
                     "failure_first": v1.reason, "failure_second": v2.reason,
                     "outcome": combine_both_orders(v1, v2)})
    write_jsonl(out, rows)
    write_manifest(out, "evaluate_head_to_head", fp,
                   {"comparisons": len(rows), "judge_requests": len(flat),
                    "outcomes": dict(Counter(r["outcome"] for r in rows))},
                   started, {"judge": _judge_label(cfg, candidate[0]), "engine": judge.stats()})
    return out, rows


# ---------------------------------------------------------------------------------------------
# metrics.json sections (pure functions of records, so the report can reuse them)


def _failure_kind(reason: str) -> str:
    # Endpoint failures carry their message; count them by kind.
    return reason.split(":", 1)[0]


def reward_model_section(ranked: Sequence[RankedPrompt], judgements: Sequence[Judgement],
                         best_score: float = 5.0) -> dict[str, Any]:
    """Table 4 metrics, single-sample and k-sample-mean, plus what the judge failed to score and
    how many samples were scored only after the score cue (`judge.force_score`)."""
    by_id = {j.response_id: j for j in judgements}
    single, mean = [], []
    for r in ranked:
        found = [by_id.get(f"{r.prompt_id}-h{i}") for i in range(len(r.responses))]
        single.append(([j.sample_scores[0] if j and j.sample_scores else None for j in found], r.human_ranks))
        mean.append(([j.mean_score if j else None for j in found], r.human_ranks))
    samples = sum(len(j.sample_scores) for j in judgements)
    failures = Counter(_failure_kind(x) for j in judgements for x in j.failure_reasons if x)
    return {
        "num_prompts": len(ranked),
        "num_responses": sum(len(r.responses) for r in ranked),
        "samples_per_response": max((len(j.sample_scores) for j in judgements), default=0),
        "single_sample": reward_model_metrics(single, best_score),
        "k_sample_mean": reward_model_metrics(mean, best_score),
        "judge_samples": samples,
        "parse_failures": sum(failures.values()),
        "parse_failure_rate": sum(failures.values()) / samples if samples else None,
        "failure_reasons": dict(sorted(failures.items())),
        # judge.force_score: samples continued after the score cue (a forced sample that still
        # fails to parse is also a parse failure above)
        "forced_score_samples": sum(SCORE_CUE in raw for j in judgements for raw in j.raw_outputs),
        "policy": RM_POLICY,
    }


def iteration_judge_health(run_dir: Path, n: int, low: float = 0.0, high: float = 5.0) -> dict[str, Any]:
    """Health of `iter<n>/judgements.jsonl` (M_n judging its own responses), or what is missing."""
    path = run_dir / f"iter{n}" / "judgements.jsonl"
    if not path.is_file():
        return {"missing": f"iter{n}/judgements.jsonl"}
    health = judge_health(iter_records(path, Judgement), low, high)  # streamed: ~200k records at paper scale
    prompts = health["num_prompts"]
    health["judged_by"] = f"M{n}"
    health["usable_pairs_per_prompt"] = health["prompts_paired"] / prompts if prompts else None
    pairs = run_dir / f"iter{n}" / "pairs.jsonl"
    health["pairs_written"] = sum(1 for _ in iter_records(pairs, PreferencePair)) if pairs.is_file() else None
    return health


def judge_health_section(cfg: Config, run_dir: Path, iteration: int) -> dict[str, Any]:
    """Iteration t-1 (the judgements that built M_t's DPO pairs) and t (M_t judging), by name."""
    j = cfg.judge
    return {f"iter{n}": iteration_judge_health(run_dir, n, j.score_low, j.score_high)
            for n in (iteration - 1, iteration) if n >= 1}


def lengths_section(answers: dict[str, Sequence[Response]]) -> dict[str, Any]:
    """Mean answer length per model (the paper notes lengths grow over iterations)."""
    out: dict[str, Any] = {}
    for name, rows in answers.items():
        n = len(rows)
        out[name] = {"num_answers": n,
                     "mean_tokens": sum(r.num_tokens for r in rows) / n if n else None,
                     "mean_chars": sum(len(r.text) for r in rows) / n if n else None,
                     "truncated_frac": sum(r.finish_reason == "length" for r in rows) / n if n else None}
    return out


def _head_to_head_section(cfg: Config, rows: Sequence[dict], candidate: str, baseline: str,
                          num_prompts: int, answers: dict[str, Any]) -> dict[str, Any]:
    failures = Counter(_failure_kind(r[key]) for r in rows for key in ("failure_first", "failure_second")
                       if r[key])
    disagreements = sum(r["outcome"] == "tie" for r in rows)
    return {"candidate": candidate, "baseline": baseline, "judge": _judge_label(cfg, candidate),
            "prompts": num_prompts, **summarize_outcomes(r["outcome"] for r in rows),
            "disagreements": disagreements, "verdict_failures": dict(sorted(failures.items())),
            "answers": answers,
            "policy": "judged in both orders; disagreement = tie; an unparsed verdict = unjudged "
                      "(rates over judged comparisons)"}


# ---------------------------------------------------------------------------------------------
# The stage


def _wall_times(paths: dict[str, Path]) -> dict[str, float]:
    import json

    out = {}
    for name, path in paths.items():
        try:
            out[name] = json.loads(manifest_path(path).read_text())["wall_time_s"]
        except (OSError, ValueError, KeyError):
            continue
    return out


def _compare(cfg: Config, ev: Evaluation, models: Models, prev_model_dir: Path,
             files: dict[str, Path]) -> tuple[dict, dict[str, list[Response]]]:
    """Answers of both models (M_{t-1} first: M_t then stays loaded to judge) and the verdicts."""
    model_dir = ev.model
    prev_path, prev = _answers(cfg, ev, models, prev_model_dir)
    cur_path, cur = _answers(cfg, ev, models, model_dir)
    judge = _make_judge(cfg, models, model_dir)
    judge_fp = {"judge_model": _model_input(judge.model_dir)} if isinstance(judge, _ModelJudge) else {}
    h2h_path, rows = _head_to_head(cfg, ev.metrics.parent, judge, judge_fp, ev.eval_prompts,
                                   (model_dir.name, cur_path, cur), (prev_model_dir.name, prev_path, prev))
    files.update({f"answers_{prev_model_dir.name}": prev_path, f"answers_{model_dir.name}": cur_path,
                  "head_to_head": h2h_path})
    num_prompts = min(len(read_records(ev.eval_prompts, Prompt)), cfg.eval.head_to_head_prompts)
    section = _head_to_head_section(cfg, rows, model_dir.name, prev_model_dir.name, num_prompts,
                                    ev.answer_params)
    return section, {model_dir.name: cur, prev_model_dir.name: prev}


def run_evaluate(cfg: Config, ev: Evaluation, fp: dict[str, Any], models: Models) -> Path:
    """Evaluate M_t (`ev.model`) against M_{t-1}; writes `ev.metrics` + its manifest (`fp`, the
    spec's fingerprint of the inputs `derive_inputs` settled on). Models load through `models`
    (in the executor's process world) only when a sub-result is not cached."""
    out, model_dir, prev_model_dir, run_dir = ev.metrics, ev.model, ev.prev_model, ev.run_dir
    if is_done(out, fp):
        return out
    started = time.time()
    files: dict[str, Path] = {"metrics": out}
    if prev_model_dir is not None:
        h2h, answers = _compare(cfg, ev, models, prev_model_dir, files)
    else:
        path, cur = _answers(cfg, ev, models, model_dir)
        h2h, answers = {"skipped": "no previous model to compare with"}, {model_dir.name: cur}
        files[f"answers_{model_dir.name}"] = path
    files["rm_judgements"], rm = _rm_judgements(cfg, out.parent, models, model_dir, ev.eft_eval)
    ranked = read_records(ev.eft_eval, RankedPrompt)
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "model": model_dir.name,
        "iteration": ev.iteration,
        "previous_model": prev_model_dir.name if prev_model_dir is not None else None,
        "reward_model": reward_model_section(ranked, rm, cfg.judge.score_high),
        "judge_health": judge_health_section(cfg, run_dir, ev.iteration),
        "head_to_head": h2h,
        "lengths": lengths_section(answers),
        "files": {name: str(path.relative_to(run_dir)) for name, path in files.items() if name != "metrics"},
        "wall_time_s": _wall_times({k: v for k, v in files.items() if k != "metrics"}),
    }
    atomic_write_json(out, metrics)
    write_manifest(out, "evaluate", fp,
                   {"rm_responses": metrics["reward_model"]["num_responses"],
                    "head_to_head_comparisons": h2h.get("num_comparisons", 0)},
                   started, {"model": model_dir.name})
    return out
