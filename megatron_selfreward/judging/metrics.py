"""Reward-model metrics (paper section 6.2 / Table 4) and judge health checks.

Input to ``reward_model_metrics``: one ``(model_scores, human_ranks)`` item per
instruction, scores aligned with ranks; ``None`` is a failed judgement, human
rank 0 is the best. Policies where the paper is silent (state them in reports):

- pairwise accuracy is pooled over all response pairs of all instructions; a
  model tie counts as incorrect; a pair where either score is None is left out
  of the denominator and counted in ``pairs_missing_score``;
- 5-best: among responses the model scored exactly ``best_score`` (5), the
  fraction that are the human's top-ranked response of their instruction;
- exact match: the model's ordering equals the human ordering; any model tie
  or any None score in the instruction makes it not exact (counted, not
  excluded, so parse failures cannot inflate the metric);
- Spearman and Kendall tau-b are computed per instruction between the scores
  and the human quality ``-rank`` (so agreement is positive), with average
  ranks for ties, over the responses that have a score, then averaged over
  instructions. Where a correlation is undefined (fewer than 2 scored
  responses, or all scores equal) the instruction is excluded and counted;
- instructions with fewer than 2 responses carry no ranking and are skipped.

The two correlations are SciPy's (``spearmanr``; ``kendalltau``, variant b).
Pairwise accuracy, 5-best and exact match are counted here: they carry the
policies above, which no library has.

Scores are compared exactly: they are means of a few half-point-grained
numbers, so equal verdicts give bit-identical floats.

``judge_health`` makes one pass over its judgements and keeps counters and a
few floats per prompt, so it can be fed a streamed file of any size.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

from megatron_selfreward.judging.preference_pairs import NoPairReason, select_pair_indices
from megatron_selfreward.records import Judgement

__all__ = [
    "average_ranks",
    "spearman",
    "kendall_tau_b",
    "reward_model_metrics",
    "judge_health",
]

RankedItem = tuple[Sequence[float | None], Sequence[int]]


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _stats() -> Any:
    # Imported on first use: scipy.stats adds ~85 MB and ~1 s to a process, and judge_health
    # (which the report calls) needs none of it.
    from scipy import stats

    return stats


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ascending; tied values share the mean of their positions."""
    return [float(r) for r in _stats().rankdata(values, method="average")] if len(values) else []


def _correlation_inputs(name: str, x: Sequence[float], y: Sequence[float]) -> bool:
    """Whether the correlation is defined; raises on unequal lengths.

    SciPy returns nan (and warns) on constant input: undefined here means None, decided before
    SciPy is called, so no warning reaches the caller.
    """
    if len(x) != len(y):
        raise ValueError(f"{name}: lengths differ ({len(x)} vs {len(y)})")
    return len(x) >= 2 and len(set(x)) > 1 and len(set(y)) > 1


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho with average ranks for ties (``scipy.stats.spearmanr``); None when
    undefined (fewer than 2 values, or either side constant)."""
    if not _correlation_inputs("spearman", x, y):
        return None
    return _finite(_stats().spearmanr(x, y).statistic)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b, (C - D) / sqrt((n0 - n1)(n0 - n2)) (``scipy.stats.kendalltau``, variant
    b); None when undefined (fewer than 2 values, or either side constant)."""
    if not _correlation_inputs("kendall_tau_b", x, y):
        return None
    return _finite(_stats().kendalltau(x, y, variant="b").statistic)


def _check_item(index: int, scores: Sequence[float | None], ranks: Sequence[int]) -> None:
    if len(scores) != len(ranks):
        raise ValueError(f"item {index}: {len(scores)} model scores but {len(ranks)} human ranks")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"item {index}: human ranks must be distinct, got {list(ranks)}")


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _pairwise_counts(scores: Sequence[float | None], ranks: Sequence[int], c: Counter) -> bool:
    """Add this instruction's pair outcomes to ``c``; True if it is an exact match."""
    exact = True
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            c["pairs_total"] += 1
            si, sj = scores[i], scores[j]
            if si is None or sj is None:
                c["pairs_missing_score"] += 1
                exact = False
                continue
            # Human: lower rank is better; model: higher score is better.
            agree = _sign(si - sj) * _sign(ranks[j] - ranks[i])
            c["pairs_evaluated"] += 1
            c["pairs_correct"] += agree > 0
            c["pairs_model_tie"] += agree == 0
            exact = exact and agree > 0
    return exact


def reward_model_metrics(items: Iterable[RankedItem], best_score: float = 5.0) -> dict:
    """Table 4 metrics over instructions; see the module docstring for policies.

    Returned keys (fractions in [0, 1], None when the denominator is 0):
    ``num_instructions``, ``instructions_skipped`` (< 2 responses),
    ``pairwise_accuracy``, ``pairs_total``, ``pairs_evaluated``,
    ``pairs_correct``, ``pairs_model_tie``, ``pairs_missing_score``,
    ``five_best_frac``, ``five_best_count`` (responses scored best_score),
    ``five_best_hits`` (of those, human rank best), ``exact_match_frac``,
    ``exact_match_count``, ``exact_match_missing_score`` (instructions with a
    None score), ``spearman_mean``, ``kendall_tau_b_mean``,
    ``correlation_instructions`` (averaged over), ``correlation_undefined``.
    """
    c: Counter = Counter()
    rhos: list[float] = []
    taus: list[float] = []
    for index, (scores, ranks) in enumerate(items):
        _check_item(index, scores, ranks)
        if len(scores) < 2:
            c["instructions_skipped"] += 1
            continue
        c["num_instructions"] += 1
        c["exact_match_count"] += _pairwise_counts(scores, ranks, c)
        c["exact_match_missing_score"] += any(s is None for s in scores)
        top_rank = min(ranks)
        for s, r in zip(scores, ranks):
            if s is not None and s == best_score:
                c["five_best_count"] += 1
                c["five_best_hits"] += r == top_rank
        scored = [(s, -r) for s, r in zip(scores, ranks) if s is not None]
        rho = spearman([s for s, _ in scored], [q for _, q in scored])
        tau = kendall_tau_b([s for s, _ in scored], [q for _, q in scored])
        if rho is None or tau is None:
            c["correlation_undefined"] += 1
        else:
            rhos.append(rho)
            taus.append(tau)
    return {
        "num_instructions": c["num_instructions"],
        "instructions_skipped": c["instructions_skipped"],
        "pairwise_accuracy": _ratio(c["pairs_correct"], c["pairs_evaluated"]),
        **{k: c[k] for k in ("pairs_total", "pairs_evaluated", "pairs_correct", "pairs_model_tie", "pairs_missing_score")},
        "five_best_frac": _ratio(c["five_best_hits"], c["five_best_count"]),
        "five_best_count": c["five_best_count"],
        "five_best_hits": c["five_best_hits"],
        "exact_match_frac": _ratio(c["exact_match_count"], c["num_instructions"]),
        "exact_match_count": c["exact_match_count"],
        "exact_match_missing_score": c["exact_match_missing_score"],
        "spearman_mean": sum(rhos) / len(rhos) if rhos else None,
        "kendall_tau_b_mean": sum(taus) / len(taus) if taus else None,
        "correlation_instructions": len(rhos),
        "correlation_undefined": c["correlation_undefined"],
    }


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (4.5 -> 4); a judge mean of 4.5
    # reads as "leaning 5" in the histogram.
    return math.floor(x + 0.5)


def _tie_counts(scores_by_prompt: Iterable[Sequence[float | None]]) -> Counter:
    """Per prompt, what pair selection would do: pair, tie or too few scored."""
    outcome: Counter = Counter()
    num_prompts = 0
    for scores in scores_by_prompt:
        picked = select_pair_indices(scores)
        outcome[picked.value if isinstance(picked, NoPairReason) else "pair"] += 1
        num_prompts += 1
    outcome["num_prompts"] = num_prompts
    return outcome


def judge_health(
    judgements: Iterable[Judgement],
    low: float = 0.0,
    high: float = 5.0,
    dominant_bucket_warn_frac: float = 0.6,
    failure_warn_rate: float = 0.1,
) -> dict:
    """Sanity numbers for one judging run; a judge collapsing to one score or
    failing to emit ``Score:`` shows here before it poisons a DPO round.

    Returned keys: ``num_judgements``, ``num_samples``, ``sample_failures``,
    ``sample_failure_rate``, ``failure_reasons`` (reason -> count),
    ``judgements_all_failed``, ``judgement_failure_rate``,
    ``hist_mean_rounded`` (round-half-up mean -> count, scored judgements),
    ``hist_sample`` (raw sample score -> count), ``num_prompts``,
    ``prompts_paired``, ``prompts_tied``, ``prompts_too_few_scored``,
    ``tie_rate`` (tied / prompts with >= 2 scored), ``dominant_bucket``,
    ``dominant_bucket_frac``, ``warnings`` (list of str).
    """
    num_judgements = num_samples = all_failed = 0
    reasons: Counter = Counter()
    by_mean = {str(b): 0 for b in range(math.ceil(low), math.floor(high) + 1)}
    samples: Counter = Counter()
    by_prompt: dict[str, list[float | None]] = {}
    for j in judgements:
        num_judgements += 1
        num_samples += len(j.sample_scores)
        reasons.update(r for r in j.failure_reasons if r is not None)
        if j.mean_score is None:
            all_failed += 1
        else:
            key = str(_round_half_up(j.mean_score))
            by_mean[key] = by_mean.get(key, 0) + 1
        samples.update(s for s in j.sample_scores if s is not None)
        by_prompt.setdefault(j.prompt_id, []).append(j.mean_score)
    failures = sum(reasons.values())
    by_sample = {f"{v:g}": samples[v] for v in sorted(samples)}
    ties = _tie_counts(by_prompt.values())
    scored = sum(by_mean.values())
    dominant = max(by_mean, key=lambda k: by_mean[k]) if scored else None
    dominant_frac = by_mean[dominant] / scored if dominant is not None else None
    warnings: list[str] = []
    if dominant_frac is not None and dominant_frac > dominant_bucket_warn_frac:
        warnings.append(
            f"score bucket {dominant} holds {dominant_frac:.1%} of scored judgements "
            f"(> {dominant_bucket_warn_frac:.0%}): the judge may have collapsed to one score"
        )
    sample_failure_rate = _ratio(failures, num_samples)
    if sample_failure_rate is not None and sample_failure_rate > failure_warn_rate:
        warnings.append(
            f"{sample_failure_rate:.1%} of judge samples failed to parse (> {failure_warn_rate:.0%}): "
            f"reasons {dict(reasons)}"
        )
    paired_or_tied = ties["pair"] + ties[NoPairReason.TIE.value]
    return {
        "num_judgements": num_judgements,
        "num_samples": num_samples,
        "sample_failures": failures,
        "sample_failure_rate": sample_failure_rate,
        "failure_reasons": dict(sorted(reasons.items())),
        "judgements_all_failed": all_failed,
        "judgement_failure_rate": _ratio(all_failed, num_judgements),
        "hist_mean_rounded": by_mean,
        "hist_sample": by_sample,
        "num_prompts": ties["num_prompts"],
        "prompts_paired": ties["pair"],
        "prompts_tied": ties[NoPairReason.TIE.value],
        "prompts_too_few_scored": ties[NoPairReason.TOO_FEW_SCORED.value],
        "tie_rate": _ratio(ties[NoPairReason.TIE.value], paired_or_tied),
        "dominant_bucket": dominant,
        "dominant_bucket_frac": dominant_frac,
        "warnings": warnings,
    }
