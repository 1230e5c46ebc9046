"""Self-Instruct prompt generation: ROUGE-L, the template, completion splitting and the filters."""

from __future__ import annotations

import pytest

from megatron_selfreward.stages.prompts import Pool, reject_reason, render_few_shot, split_completion
from megatron_selfreward.stages.rouge import lcs_length, rouge_l_f, rouge_tokens


def test_rouge_tokens_lowercase_alphanumeric_words():
    assert rouge_tokens("Write a Haiku, about C3PO's day!") == ["write", "a", "haiku", "about", "c3po", "s", "day"]


@pytest.mark.parametrize("a, b, expected", [
    ("", "", 0), ("a b c", "", 0), ("a b c", "a b c", 3), ("a b c d", "a c d", 3),
    ("a b c", "c b a", 1), ("x a y b z c", "a b c", 3), ("a a a", "a", 1),
])
def test_lcs_length(a, b, expected):
    assert lcs_length(a.split(), b.split()) == expected
    assert lcs_length(b.split(), a.split()) == expected


def test_rouge_l_f_by_hand():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = the cat on the mat = 5
    cand, ref = rouge_tokens("The cat sat on the mat"), rouge_tokens("the cat lay on the mat")
    p = r = 5 / 6
    assert rouge_l_f(cand, ref) == pytest.approx(2 * p * r / (p + r))
    # Unequal lengths: P = 2/2, R = 2/4 -> F = 2/3
    assert rouge_l_f(["a", "b"], ["a", "x", "b", "y"]) == pytest.approx(2 / 3)
    assert rouge_l_f([], ["a"]) == 0.0
    assert rouge_l_f(["a"], ["a"]) == 1.0


def test_rouge_l_matches_rouge_score_package_when_installed():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("Give three tips for staying healthy.", "What are three tips for staying healthy?"),
             ("Explain photosynthesis to a child", "Describe how plants make food from light")]
    for a, b in pairs:
        assert rouge_l_f(rouge_tokens(a), rouge_tokens(b)) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure)


def test_render_few_shot_is_self_instructs_template():
    text = render_few_shot(["Say hi.", "Name  a\ncolour."])
    assert text == "Come up with a series of tasks:\n1. Say hi.\n2. Name a colour.\n3."


def test_split_completion_on_numbered_lines_and_drops_a_cut_last_item():
    completion = " Plan a picnic menu\n10. Explain tides simply\n11 . List five rivers\n12. Describe the"
    assert split_completion(completion, truncated=False) == [
        "Plan a picnic menu", "Explain tides simply", "List five rivers", "Describe the"]
    assert split_completion(completion, truncated=True)[-1] == "List five rivers"


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("Say hi", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image below in detail", "blacklisted_keyword"),
    ("Please go to the store and report", "blacklisted_keyword"),
    ("Plot the sales numbers for me", "blacklisted_keyword"),
    ("Write a program that sorts a list", "write_a_program"),
    ("- List three colours of the flag", "starts_with_punctuation"),
    ("Écris un poème sur la mer", "starts_with_non_ascii"),
    ("Explain how tides work", None),
    ("Summarise the profile of a mapping function", None),  # "map" only as a whole word
])
def test_reject_reason(text, reason):
    assert reject_reason(text, min_words=3, max_words=150) == reason


def test_word_limits_are_inclusive():
    assert reject_reason("one two three", 3, 150) is None
    assert reject_reason(" ".join(["w"] * 150), 3, 150) is None


def test_pool_rejects_duplicates_and_near_duplicates_and_grows():
    pool = Pool(["Give three tips for staying healthy."], threshold=0.7)
    assert pool.reason("give three  tips for staying healthy.") == "duplicate"
    assert pool.reason("Give three tips for staying very healthy") == "rouge_l_similar"
    assert pool.reason("Explain how a rainbow forms") is None
    pool.add("Explain how a rainbow forms")
    assert pool.reason("Explain how a rainbow forms!") == "rouge_l_similar"  # punctuation differs
