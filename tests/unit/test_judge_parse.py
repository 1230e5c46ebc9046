"""The judge-score parser on real-looking judge outputs; failures are never 0."""

from __future__ import annotations

import pytest

from megatron_selfreward.judging.parse import (
    FAILURE_REASONS,
    MALFORMED_NUMBER,
    MISSING,
    NOT_A_NUMBER,
    OUT_OF_RANGE,
    WRONG_SCALE,
    ParsedScore,
    aggregate,
    judgement_from_outputs,
    parse_score,
)

TYPICAL = (
    "The response is relevant and addresses the user's question about boiling eggs, "
    "giving clear timings for soft and hard yolks. It is well organised and written from "
    "an AI Assistant's perspective, though it omits altitude adjustments.\n\nScore: 4"
)

CASES = [
    # (id, judge output, expected score, expected reason)
    ("typical", TYPICAL, 4.0, None),
    ("bold_label", "Justification: concise and accurate.\n\n**Score:** 4", 4.0, None),
    ("bold_all", "Good answer.\n**Score: 5**", 5.0, None),
    ("bold_label_colon_outside", "**Score**: 3", 3.0, None),
    ("bold_value", "Score: **2**", 2.0, None),
    ("half_point", "Mostly complete.\nScore: 4.5", 4.5, None),
    ("over_five", "Score: 4/5", 4.0, None),
    ("half_over_five", "The answer is solid.\nScore: 4.5/5", 4.5, None),
    ("spaced_fraction", "Score: 3 / 5", 3.0, None),
    ("out_of", "Score: 3 out of 5", 3.0, None),
    ("points_suffix", "score: 3 points", 3.0, None),
    ("lowercase", "score:2", 2.0, None),
    ("uppercase", "SCORE: 1", 1.0, None),
    ("final_score_label", "Final Score: 5", 5.0, None),
    ("total_score_label", "Total score: 2.", 2.0, None),
    ("zero_is_valid", "Irrelevant response.\nScore: 0", 0.0, None),
    ("newline_after_label", "Score:\n3", 3.0, None),
    ("trailing_text", "Score: 4\n\nI hope this evaluation helps!", 4.0, None),
    ("leading_dot", "Score: .5", 0.5, None),
    # several scores: the last wins (criteria walk-through, then the verdict)
    (
        "running_tally_last_wins",
        "- Relevance: Score: 1\n- Coverage: Score: 2\n- Useful: Score: 3\n"
        "The response is not tailored enough for a fifth point.\nScore: 3",
        3.0,
        None,
    ),
    ("revised_last_wins", "Score: 5\n\nOn reflection the answer misses the point.\nScore: 2", 2.0, None),
    # the last label is not a usable number: it wins anyway (no fallback to earlier ones)
    ("echoed_format_last", "Score: 4\nConclude with the score using the format: “Score: <total points>”", None, NOT_A_NUMBER),
    # failures
    ("ten_rejected", "Score: 10", None, OUT_OF_RANGE),
    ("five_point_five", "Score: 5.5", None, OUT_OF_RANGE),
    ("negative", "Score: -1", None, OUT_OF_RANGE),
    ("six_over_five", "Score: 6/5", None, OUT_OF_RANGE),
    ("ten_scale", "Score: 8/10", None, WRONG_SCALE),
    ("ten_scale_low", "Score: 4/10", None, WRONG_SCALE),
    ("hundred_scale", "Score: 80 out of 100", None, WRONG_SCALE),
    ("word_number", "Score: four", None, NOT_A_NUMBER),
    ("placeholder", "Score: <total points>", None, NOT_A_NUMBER),
    ("na", "Score: N/A", None, NOT_A_NUMBER),
    ("no_label", "The response deserves four points out of five.", None, MISSING),
    ("no_colon", "I give it a score of 4", None, MISSING),
    ("underscore_word", "my_underscore: 4", None, MISSING),
    ("empty", "", None, MISSING),
    ("whitespace", "   \n\t ", None, MISSING),
    ("garbage", "asdf ##!! ]]] 4 5 3 ... lorem ipsum", None, MISSING),
    ("truncated_after_label", "The answer is helpful and\nScore:", None, MISSING),
    ("truncated_bold", "**Score:** ", None, MISSING),
    ("response_continues", "<response>Sure! Here is a recipe...</response>", None, MISSING),
]


@pytest.mark.parametrize("text, score, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_judge_parse_table(text, score, reason):
    parsed = parse_score(text)
    assert parsed == ParsedScore(score, reason)
    assert parsed.ok is (score is not None)


def test_judge_parse_failures_are_never_zero():
    for _, text, _, reason in CASES:
        parsed = parse_score(text)
        if reason is not None:
            assert parsed.score is None and parsed.reason in FAILURE_REASONS


def test_judge_parse_custom_scale():
    assert parse_score("Score: 8/10", low=1, high=10) == ParsedScore(8.0, None)
    assert parse_score("Score: 8/5", low=1, high=10) == ParsedScore(None, WRONG_SCALE)
    assert parse_score("Score: 0", low=1, high=10) == ParsedScore(None, OUT_OF_RANGE)


def test_judge_parse_boundaries_inclusive():
    assert parse_score("Score: 5").score == 5.0
    assert parse_score("Score: 5/5").score == 5.0
    assert parse_score("Score: 5.0/5.0").score == 5.0
    assert parse_score("Score: 0/5").score == 0.0


def test_judge_aggregate_mean_of_successes():
    ok4, ok5, bad = ParsedScore(4.0, None), ParsedScore(5.0, None), ParsedScore(None, MISSING)
    assert aggregate([ok4, ok5, bad]) == 4.5  # the failure is dropped, not averaged in as 0
    assert aggregate([bad, bad]) is None
    assert aggregate([]) is None
    assert aggregate([ok4, ok4, ok5]) == pytest.approx(13 / 3)


def test_judge_judgement_from_outputs():
    outputs = ["Fine.\nScore: 4", "Score: 8/10", "**Score:** 5"]
    j = judgement_from_outputs("p1", "p1-r2", outputs)
    assert j.sample_scores == [4.0, None, 5.0]
    assert j.failure_reasons == [None, WRONG_SCALE, None]
    assert j.raw_outputs == outputs
    assert j.mean_score == 4.5
    failed = judgement_from_outputs("p1", "p1-r3", ["???", ""])
    assert failed.mean_score is None and failed.failure_reasons == [MISSING, MISSING]


@pytest.mark.parametrize("text", [
    "Score: 1,5",        # decimal comma: 1.5 or 1?
    "**Score:** 4,5/5",
    "Score: 3.7e1",      # an exponent: 37, not 3.7
    "Score: 4E0",
    "Score: 2e-1",
    "Score: 4.5.1",      # a version-like number
    "Score: 1,000",      # thousands separator
])
def test_judge_parse_refuses_numbers_it_would_misread(text):
    parsed = parse_score(text)
    assert parsed == ParsedScore(None, MALFORMED_NUMBER)
    assert parsed.reason in FAILURE_REASONS
    assert judgement_from_outputs("p", "r", [text]).mean_score is None


@pytest.mark.parametrize("text, score", [
    ("Score: 4, a solid answer", 4.0),     # a comma then prose is punctuation, not a decimal
    ("Score: 3. The answer is fine.", 3.0),
    ("Score: 2 (e.g. partial)", 2.0),
])
def test_judge_parse_punctuation_after_the_number_is_fine(text, score):
    assert parse_score(text) == ParsedScore(score, None)
