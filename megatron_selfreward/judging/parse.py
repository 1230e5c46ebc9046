"""Parse the judge's ``Score: <total points>`` and average sampled verdicts.

The paper leaves the parser unspecified; this is the project default
(paper-spec 3.1): case-insensitive, the LAST ``Score:`` label wins (the judge
justifies first and concludes with the score, and may quote the format string
earlier), the value must lie in [low, high], ``x/5`` is accepted only when the
denominator is the scale's top. A failure is ``score=None`` with a reason and
is never turned into 0: a 0 would silently make the failed response the
"rejected" side of a preference pair.

Accepted values: a plain decimal with a point or none (``4``, ``4.5``, ``.5``),
optionally in markdown emphasis (``**4**``) and followed by ``/5`` or ``out of 5``
or by words (``4 points``, ``2.``). Refused as ``malformed_number``: a decimal
comma or thousands separator (``1,5``: 1.5 or 1?), an exponent (``3.7e1``) and a
second decimal point (``4.5.1``); reading only their first digits would record a
score the judge never gave.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from megatron_selfreward.records import Judgement

__all__ = [
    "MISSING",
    "NOT_A_NUMBER",
    "OUT_OF_RANGE",
    "WRONG_SCALE",
    "MALFORMED_NUMBER",
    "FAILURE_REASONS",
    "ParsedScore",
    "parse_score",
    "aggregate",
    "judgement_from_outputs",
]

# Failure reasons are plain strings so they serialise into Judgement records as is.
MISSING = "missing"
NOT_A_NUMBER = "not_a_number"
OUT_OF_RANGE = "out_of_range"
WRONG_SCALE = "wrong_scale"
MALFORMED_NUMBER = "malformed_number"
FAILURE_REASONS = (MISSING, NOT_A_NUMBER, OUT_OF_RANGE, WRONG_SCALE, MALFORMED_NUMBER)

# "Score:", "score :", "**Score:**", "**Score**:", "Final score:". The word
# boundary keeps "underscore:" out.
_LABEL = re.compile(r"\bscore\b[*_ \t]*:", re.IGNORECASE)
# The value right after the label, allowing markdown emphasis before it and an
# optional "/ 5" or "out of 5" after it. Trailing words ("3 points") are ignored.
_VALUE = re.compile(
    r"[*_\s]*(?P<num>[-+]?(?:\d+(?:\.\d+)?|\.\d+))"
    r"(?:\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)
# What may not directly follow the number: its digits would go on in a form that is refused.
_NUMBER_GOES_ON = re.compile(r"[.,]\d|[eE][-+]?\d")


@dataclass(frozen=True)
class ParsedScore:
    """One judge sample's score, or None and the reason it failed."""

    score: float | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.score is not None


def parse_score(text: str, low: float = 0.0, high: float = 5.0) -> ParsedScore:
    """Parse the last ``Score:`` in a judge output; see the module docstring."""
    labels = list(_LABEL.finditer(text))
    if not labels:
        return ParsedScore(None, MISSING)
    tail = text[labels[-1].end():]
    if not tail.strip(" \t\r\n*_"):
        # "Score:" with nothing after it: usually a generation cut at max tokens.
        return ParsedScore(None, MISSING)
    match = _VALUE.match(tail)
    if match is None:
        return ParsedScore(None, NOT_A_NUMBER)
    if _NUMBER_GOES_ON.match(tail, match.end("num")):
        return ParsedScore(None, MALFORMED_NUMBER)
    value = float(match.group("num"))
    den = match.group("den")
    if den is not None and not math.isclose(float(den), high):
        return ParsedScore(None, WRONG_SCALE)
    if not low <= value <= high:
        return ParsedScore(None, OUT_OF_RANGE)
    return ParsedScore(value, None)


def aggregate(parsed: Sequence[ParsedScore]) -> float | None:
    """Mean of the successful samples; None when all failed (or none given)."""
    ok = [p.score for p in parsed if p.score is not None]
    return sum(ok) / len(ok) if ok else None


def judgement_from_outputs(
    prompt_id: str,
    response_id: str,
    raw_outputs: Sequence[str],
    low: float = 0.0,
    high: float = 5.0,
) -> Judgement:
    """Parse k sampled judge outputs for one response into a Judgement record."""
    parsed = [parse_score(text, low, high) for text in raw_outputs]
    return Judgement(
        prompt_id=prompt_id,
        response_id=response_id,
        sample_scores=[p.score for p in parsed],
        raw_outputs=list(raw_outputs),
        failure_reasons=[p.reason for p in parsed],
        mean_score=aggregate(parsed),
    )
