"""Pairwise judging for head-to-head evaluation (paper section 6.1): prompt, verdict, both orders.

The paper compares two models' answers with the AlpacaEval evaluation prompt, judged in both
orders; when the two verdicts disagree the comparison is a tie. ``pairwise_prompt.txt`` beside
this file is the AlpacaFarm/AlpacaEval "Output (a) or Output (b)" prompt (one user turn, one
worked example), the form open models follow best.

Parsing policy (the paper has none; judges rarely answer with exactly ``Output (a)``):
- the question ``Output (a) or Output (b)`` echoed back is ignored;
- labels ``Output (a)``, ``Output: b``, ``output (B)`` ... are found anywhere; labels at the
  start of a line decide first (``Output (b). Output (a) is a joke.`` is b), else all labels
  must agree; a bare ``a`` / ``(b)`` / ``B.`` as the whole answer counts too;
- anything else is not a verdict (``missing``) or two verdicts at once (``ambiguous``). A
  comparison with an unparsed verdict is ``unjudged``: counted and reported, never guessed.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Literal

__all__ = [
    "SLOTS",
    "PairwiseVerdict",
    "Outcome",
    "load_pairwise_template",
    "render_pairwise_prompt",
    "parse_pairwise_verdict",
    "combine_both_orders",
    "summarize_outcomes",
]

Choice = Literal["a", "b"]
Outcome = Literal["win", "tie", "loss", "unjudged"]
OUTCOMES: tuple[Outcome, ...] = ("win", "tie", "loss", "unjudged")

SLOTS = ("INSTRUCTION_HERE", "OUTPUT_A_HERE", "OUTPUT_B_HERE")
_SLOT = re.compile(r"<(" + "|".join(SLOTS) + r")>")
_PACKAGED_TEMPLATE = "pairwise_prompt.txt"

MISSING = "missing"
AMBIGUOUS = "ambiguous"

_ECHO = re.compile(r"output\s*\(\s*a\s*\)\s*or\s*output\s*\(\s*b\s*\)", re.IGNORECASE)
# "Output (a)", "Output: b", "output(B)"; a bare letter must end a word ("Output as" is no label).
_LABEL = re.compile(r"\boutput\s*[:\-]?\s*(?:\(\s*([ab])\s*\)|([ab])\b)", re.IGNORECASE)
# Markdown and quoting a judge may put before a verdict at the start of a line.
_LINE_LEAD = re.compile(r"[ \t>#*_`\"'\-]*")
_BARE = re.compile(r"\(?\s*([ab])\s*\)?[.!]?", re.IGNORECASE)


@dataclass(frozen=True)
class PairwiseVerdict:
    """Which output the judge preferred ("a" or "b"), or None and why not."""

    choice: Choice | None
    reason: str | None = None


def load_pairwise_template() -> str:
    """The packaged pairwise prompt (trailing newline stripped)."""
    return _packaged_template()


@functools.lru_cache(maxsize=1)
def _packaged_template() -> str:
    text = resources.files(__package__).joinpath(_PACKAGED_TEMPLATE).read_text(encoding="utf-8")
    for slot in SLOTS:
        if text.count(f"<{slot}>") != 1:
            raise ValueError(f"{_PACKAGED_TEMPLATE} must contain <{slot}> exactly once")
    return text.rstrip("\n")


def render_pairwise_prompt(instruction: str, output_a: str, output_b: str,
                           template: str | None = None) -> str:
    """Fill the slots in one pass, so slot-like text inside an answer is never substituted."""
    values = {"INSTRUCTION_HERE": instruction, "OUTPUT_A_HERE": output_a, "OUTPUT_B_HERE": output_b}
    return _SLOT.sub(lambda m: values[m.group(1)], load_pairwise_template() if template is None else template)


def _is_line_start(text: str, pos: int) -> bool:
    line_start = text.rfind("\n", 0, pos) + 1
    return _LINE_LEAD.fullmatch(text[line_start:pos]) is not None


def parse_pairwise_verdict(text: str | None) -> PairwiseVerdict:
    """The judge's choice; see the module docstring for the policy."""
    if text is None or not text.strip():
        return PairwiseVerdict(None, MISSING)
    cleaned = _ECHO.sub(" ", text)
    labels = [(m.start(), (m.group(1) or m.group(2)).lower()) for m in _LABEL.finditer(cleaned)]
    if not labels:
        bare = _BARE.fullmatch(cleaned.strip(" \t\r\n*_`\"'"))
        if bare is None:
            return PairwiseVerdict(None, MISSING)
        return PairwiseVerdict(bare.group(1).lower(), None)  # type: ignore[arg-type]
    leading = {choice for pos, choice in labels if _is_line_start(cleaned, pos)}
    choices = leading or {choice for _, choice in labels}
    if len(choices) == 1:
        return PairwiseVerdict(choices.pop(), None)  # type: ignore[arg-type]
    return PairwiseVerdict(None, AMBIGUOUS)


def combine_both_orders(candidate_first: PairwiseVerdict, candidate_second: PairwiseVerdict) -> Outcome:
    """The candidate's outcome from two verdicts: shown as (a) first, then as (b).

    Agreement is a win or a loss; disagreement is a tie (paper 6.1: the judge's position bias
    cancels out); a comparison with an unparsed verdict is "unjudged".
    """
    if candidate_first.choice is None or candidate_second.choice is None:
        return "unjudged"
    first_prefers = candidate_first.choice == "a"
    second_prefers = candidate_second.choice == "b"
    if first_prefers and second_prefers:
        return "win"
    if not first_prefers and not second_prefers:
        return "loss"
    return "tie"


def summarize_outcomes(outcomes: Iterable[Outcome]) -> dict:
    """Counts and rates; win/tie/loss rates are over judged comparisons (None when none)."""
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown head-to-head outcomes {sorted(unknown)} (expected {OUTCOMES})")
    total = sum(counts.values())
    judged = total - counts["unjudged"]
    out: dict = {"num_comparisons": total, "judged": judged}
    out.update({name: counts[name] for name in OUTCOMES})
    for name in ("win", "tie", "loss"):
        out[f"{name}_rate"] = counts[name] / judged if judged else None
    out["unjudged_rate"] = counts["unjudged"] / total if total else None
    return out
