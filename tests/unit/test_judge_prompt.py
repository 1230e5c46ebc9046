"""The packaged judge prompt is the paper's Figure 2 text; rendering fills its slots once."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_selfreward.judging import prompt as judge_prompt
from megatron_selfreward.judging.prompt import (
    INSTRUCTION_SLOT,
    RESPONSE_SLOT,
    TemplateError,
    load_template,
    render_judge_prompt,
)

# Sentences copied from the paper's Figure 2 (typographic apostrophes/quotes as in the PDF).
CRITERIA = [
    "- Add 1 point if the response is relevant and provides some information related to the user’s inquiry, "
    "even if it is incomplete or contains some irrelevant content.",
    "- Add another point if the response addresses a substantial portion of the user’s question, but does not "
    "completely resolve the query or provide a direct answer.",
    "- Award a third point if the response answers the basic elements of the user’s question in a useful way, "
    "regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found "
    "in blogs or search results.",
    "- Grant a fourth point if the response is clearly written from an AI Assistant’s perspective, addressing the "
    "user’s question directly and comprehensively, and is well-organized and helpful, even if there is slight room "
    "for improvement in clarity, conciseness or focus.",
    "- Bestow a fifth point for a response that is impeccably tailored to the user’s question by an AI Assistant, "
    "without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and "
    "insightful answer.",
]
OPENING = (
    "Review the user’s question and the corresponding response using the additive 5-point scoring system described "
    "below. Points are accumulated based on the satisfaction of each criterion:"
)
AFTER = (
    "After examining the user’s instruction and the response:\n"
    "- Briefly justify your total score, up to 100 words.\n"
    "- Conclude with the score using the format: “Score: <total points>”"
)
CLOSING = (
    "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate "
    "the response in alignment with this additive scoring model, we’ll systematically attribute points based on the "
    "outlined criteria."
)


def test_judge_prompt_template_is_figure_2():
    template = load_template()
    # The whole figure, paragraph breaks included, assembled from the verbatim pieces.
    expected = "\n\n".join(
        [
            OPENING,
            "\n".join(CRITERIA),
            f"User: {INSTRUCTION_SLOT}\n<response>{RESPONSE_SLOT}</response>",
            AFTER,
            CLOSING,
        ]
    )
    assert template == expected


def test_judge_prompt_render_structure():
    instruction = "How do I boil an egg?"
    response = "Put it in boiling water for 7 minutes."
    text = render_judge_prompt(instruction, response)
    assert text.startswith("Review the user’s question")
    assert f"\n\nUser: {instruction}\n<response>{response}</response>\n\n" in text
    assert text.endswith("based on the outlined criteria.")
    for sentence in CRITERIA + [AFTER, CLOSING]:
        assert sentence in text
    assert INSTRUCTION_SLOT not in text and RESPONSE_SLOT not in text
    # Typographic quotes kept, not normalised to ASCII.
    assert "user’s" in text and "“Score: <total points>”" in text and "user's" not in text


def test_judge_prompt_slot_text_in_inputs_is_not_substituted_twice():
    instruction = f"Please explain what {RESPONSE_SLOT} means in a template."
    response = f"It is a placeholder, like {INSTRUCTION_SLOT}."
    text = render_judge_prompt(instruction, response)
    assert f"User: {instruction}\n<response>{response}</response>" in text
    assert text.count(RESPONSE_SLOT) == 1 and text.count(INSTRUCTION_SLOT) == 1


def test_judge_prompt_multiline_and_empty_inputs():
    text = render_judge_prompt("line 1\nline 2", "")
    assert "User: line 1\nline 2\n<response></response>" in text


def test_judge_prompt_custom_template_string_and_slot_order():
    assert render_judge_prompt("Q", "A", template="I=<INSTRUCTION_HERE> R=<RESPONSE_HERE>") == "I=Q R=A"
    # Slots in reverse order still land in the right places.
    assert render_judge_prompt("Q", "A", template="R=<RESPONSE_HERE> I=<INSTRUCTION_HERE>!") == "R=A I=Q!"


def test_judge_prompt_custom_template_file(tmp_path: Path):
    path = tmp_path / "judge.txt"
    path.write_text("Rate <INSTRUCTION_HERE> / <RESPONSE_HERE>\n\n", encoding="utf-8")
    template = load_template(path)
    assert template == "Rate <INSTRUCTION_HERE> / <RESPONSE_HERE>"
    assert render_judge_prompt("q", "a", template=template) == "Rate q / a"


@pytest.mark.parametrize(
    "text, slot",
    [
        ("no slots at all", INSTRUCTION_SLOT),
        ("only <INSTRUCTION_HERE>", RESPONSE_SLOT),
        ("only <RESPONSE_HERE>", INSTRUCTION_SLOT),
        ("twice <INSTRUCTION_HERE> <INSTRUCTION_HERE> <RESPONSE_HERE>", INSTRUCTION_SLOT),
    ],
)
def test_judge_prompt_custom_template_missing_slot_is_a_clear_error(tmp_path: Path, text, slot):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TemplateError, match=rf"{path}.*{slot}"):
        load_template(path)
    with pytest.raises(TemplateError, match=slot):
        render_judge_prompt("q", "a", template=text)


def test_judge_prompt_txt_ships_inside_the_package():
    # The template is read as package data, so it must sit beside prompt.py.
    assert (Path(judge_prompt.__file__).parent / "judge_prompt.txt").is_file()
