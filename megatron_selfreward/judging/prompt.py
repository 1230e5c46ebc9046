"""The LLM-as-a-Judge prompt (paper Figure 2) and its rendering.

``judge_prompt.txt`` beside this file is the paper's prompt verbatim,
typographic quotes included: EFT training targets were produced with this exact
text, so any drift between training and judging would blunt the judge. The
rendered prompt is sent as a single user turn in the model's chat template.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

__all__ = [
    "INSTRUCTION_SLOT",
    "RESPONSE_SLOT",
    "TemplateError",
    "load_template",
    "render_judge_prompt",
]

INSTRUCTION_SLOT = "<INSTRUCTION_HERE>"
RESPONSE_SLOT = "<RESPONSE_HERE>"

_PACKAGED_TEMPLATE = "judge_prompt.txt"


class TemplateError(ValueError):
    """A judge template is unusable (e.g. a slot is missing)."""


def _check_template(text: str, origin: str) -> str:
    for slot in (INSTRUCTION_SLOT, RESPONSE_SLOT):
        count = text.count(slot)
        if count != 1:
            raise TemplateError(f"judge template {origin} must contain the slot {slot} exactly once, found {count}")
    return text


def load_template(path: str | Path | None = None) -> str:
    """The judge template: the packaged Figure 2 prompt, or a custom file.

    Trailing newlines are stripped (a text file ends with one; the prompt does
    not), everything else is kept byte for byte.
    """
    if path is None:
        return _packaged_template()
    return _check_template(Path(path).read_text(encoding="utf-8").rstrip("\n"), str(path))


@functools.lru_cache(maxsize=1)
def _packaged_template() -> str:
    # Cached: judging renders the prompt a dozen times per generated prompt.
    text = resources.files(__package__).joinpath(_PACKAGED_TEMPLATE).read_text(encoding="utf-8")
    return _check_template(text.rstrip("\n"), f"(packaged {_PACKAGED_TEMPLATE})")


def render_judge_prompt(instruction: str, response: str, template: str | None = None) -> str:
    """Fill the template's slots with the instruction and response.

    Splitting on the slots (instead of chained ``str.replace``) means slot-like
    text inside the user's instruction or the response is inserted literally
    and never substituted a second time.
    """
    text = load_template() if template is None else _check_template(template, "(given as a string)")
    before_instr, after_instr = text.split(INSTRUCTION_SLOT)
    if RESPONSE_SLOT in before_instr:
        before_resp, between = before_instr.split(RESPONSE_SLOT)
        return before_resp + response + between + instruction + after_instr
    between, after_resp = after_instr.split(RESPONSE_SLOT)
    return before_instr + instruction + between + response + after_resp
