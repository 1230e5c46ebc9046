"""Preference-pair selection: the AIFT(M_t) rule of paper section 4.

Per prompt: chosen = the candidate with the highest mean judge score,
rejected = the one with the lowest; if the two scores tie the prompt yields no
pair (the paper discards it). Candidates whose every judge sample failed to
parse have no score and take no part: treating them as 0 would make every
unparseable verdict a "rejected" example.

Tie-breaking among candidates sharing the max (or the min) score is by
response order: the FIRST such candidate in the given order wins (or loses).
Response order is the sampling order written by the generation stage, so the
choice is reproducible from the files alone.

Length control (e.g. penalising long chosen responses) is not implemented.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Iterable, Sequence

from megatron_selfreward.records import Judgement, PreferencePair, Prompt, Response

__all__ = ["NoPairReason", "select_pair_indices", "scores_in_response_order", "preference_pair", "build_pair"]

# Means of up to 3 samples in [0, 5] are exact in binary floating point in
# practice, but a tolerance keeps "tie" robust to any other aggregation.
_TIE_ABS_TOL = 1e-9


class NoPairReason(str, Enum):
    """Why a prompt produced no preference pair (values serialise as plain strings)."""

    TIE = "tie"
    TOO_FEW_SCORED = "too_few_scored"

    # (str, Enum) rather than StrEnum: the project supports Python 3.10.
    def __str__(self) -> str:
        return self.value


def select_pair_indices(scores: Sequence[float | None]) -> tuple[int, int] | NoPairReason:
    """(chosen index, rejected index) into ``scores``, or why there is no pair.

    ``None`` marks an unscored candidate, which is skipped. Ties for max/min go
    to the first candidate in order.
    """
    scored = [(i, s) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return NoPairReason.TOO_FEW_SCORED
    # max()/min() return the first of equal keys, which is the documented tie-break.
    best_i, best = max(scored, key=lambda item: item[1])
    worst_i, worst = min(scored, key=lambda item: item[1])
    if math.isclose(best, worst, rel_tol=0.0, abs_tol=_TIE_ABS_TOL):
        return NoPairReason.TIE
    return best_i, worst_i


def scores_in_response_order(prompt_id: str, response_ids: Sequence[str],
                             judged: Iterable[tuple[str, float | None]]) -> list[float | None]:
    """Mean score per response of one prompt, in response order, from its judgements'
    ``(response_id, mean_score)``; a missing, doubled or unknown judgement is a ValueError.

    A missing or foreign judgement means the judging stage and the response file disagree;
    silently dropping it would bias which pairs survive.
    """
    by_id: dict[str, float | None] = {}
    for response_id, mean_score in judged:
        if response_id in by_id:
            raise ValueError(f"prompt {prompt_id!r}: two judgements for response {response_id!r}")
        by_id[response_id] = mean_score
    scores: list[float | None] = []
    seen: set[str] = set()
    for response_id in response_ids:
        if response_id in seen:
            raise ValueError(f"prompt {prompt_id!r}: duplicate response_id {response_id!r}")
        seen.add(response_id)
        if response_id not in by_id:
            raise ValueError(f"prompt {prompt_id!r}: response {response_id!r} has no judgement")
        scores.append(by_id[response_id])
    extra = sorted(set(by_id) - seen)
    if extra:
        raise ValueError(f"prompt {prompt_id!r}: judgements for unknown responses {extra}")
    return scores


def _scores_in_response_order(
    prompt: Prompt, responses: Sequence[Response], judgements: Sequence[Judgement]
) -> list[float | None]:
    for j in judgements:
        if j.prompt_id != prompt.prompt_id:
            raise ValueError(f"judgement for response {j.response_id!r} has prompt_id {j.prompt_id!r}, expected {prompt.prompt_id!r}")
    for r in responses:
        if r.prompt_id != prompt.prompt_id:
            raise ValueError(f"response {r.response_id!r} has prompt_id {r.prompt_id!r}, expected {prompt.prompt_id!r}")
    return scores_in_response_order(prompt.prompt_id, [r.response_id for r in responses],
                                    [(j.response_id, j.mean_score) for j in judgements])


def preference_pair(prompt: Prompt, chosen: Response, rejected: Response,
                    chosen_score: float, rejected_score: float) -> PreferencePair:
    """The DPO record of a selected pair, with its response ids as provenance."""
    return PreferencePair(
        prompt_id=prompt.prompt_id,
        prompt=prompt.text,
        chosen=chosen.text,
        rejected=rejected.text,
        chosen_score=chosen_score,
        rejected_score=rejected_score,
        chosen_response_id=chosen.response_id,
        rejected_response_id=rejected.response_id,
    )


def build_pair(
    prompt: Prompt, responses: Sequence[Response], judgements: Sequence[Judgement]
) -> tuple[PreferencePair | None, NoPairReason | None]:
    """The preference pair for one prompt, or ``(None, reason)``.

    ``judgements`` may come in any order; each response needs exactly one.
    Raises ValueError when ids do not line up.
    """
    scores = _scores_in_response_order(prompt, responses, judgements)
    picked = select_pair_indices(scores)
    if isinstance(picked, NoPairReason):
        return None, picked
    chosen_i, rejected_i = picked
    pair = preference_pair(prompt, responses[chosen_i], responses[rejected_i],
                           scores[chosen_i], scores[rejected_i])  # type: ignore[arg-type]
    return pair, None
