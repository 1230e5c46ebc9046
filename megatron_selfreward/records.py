"""Records: the nouns that stages read and write, one JSON object per JSONL line.

Every record is a frozen dataclass deriving ``Record``, which gives it ``to_dict()``
(JSON-ready) and ``from_dict(d, where)``. Validation runs in ``__post_init__``, so a record built
in code is checked exactly like one read from disk; ``from_dict`` adds the
location (``"iter1/pairs.jsonl line 7"``) to the error so a bad line in a
100k-line file can be found without a debugger.

Unknown keys are rejected rather than ignored: a misspelt optional field would
otherwise vanish silently. Free-form extras belong in ``meta``.

Immutability is shallow: list and dict fields are not copied or frozen, so
callers must not mutate them after construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "RecordError",
    "Record",
    "Prompt",
    "Response",
    "Judgement",
    "PreferencePair",
    "SFTExample",
    "RankedPrompt",
    "CHAT_ROLES",
]

CHAT_ROLES = ("system", "user", "assistant")

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record failed validation; the message names where and which field."""

    def __init__(self, where: str, field_name: str | None, problem: str) -> None:
        self.where = where
        self.field_name = field_name
        self.problem = problem
        if field_name is None:
            super().__init__(f"{where}: {problem}")
        else:
            super().__init__(f"{where}: field '{field_name}' {problem}")

    def at(self, where: str) -> "RecordError":
        """The same problem, reported at a new location (e.g. a file and line)."""
        return RecordError(where, self.field_name, self.problem)


# ---------------------------------------------------------------------------
# Field checks. Each returns the (possibly normalised) value or raises.
# JSON has no int/float distinction that survives every writer, so float
# fields accept ints; bool is rejected everywhere because it is an int subclass
# and `True` as a score is always a bug.


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_str(rec: Any, name: str, value: Any, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(type(rec).__name__, name, f"must be a string, got {_type_name(value)}")
    if nonempty and not value:
        raise RecordError(type(rec).__name__, name, "must be a non-empty string")
    return value


def _check_int(rec: Any, name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(type(rec).__name__, name, f"must be an integer, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise RecordError(type(rec).__name__, name, f"must be >= {minimum}, got {value}")
    return value


def _as_float(value: Any) -> float | None:
    """A finite float from an int/float, else None (caller reports the error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _check_float(rec: Any, name: str, value: Any, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    out = _as_float(value)
    if out is None:
        kind = "a finite number or null" if optional else "a finite number"
        raise RecordError(type(rec).__name__, name, f"must be {kind}, got {value!r}")
    return out


def _check_list(rec: Any, name: str, value: Any) -> list:
    if not isinstance(value, list):
        raise RecordError(type(rec).__name__, name, f"must be a list, got {_type_name(value)}")
    return value


def _check_dict(rec: Any, name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise RecordError(type(rec).__name__, name, f"must be an object/dict, got {_type_name(value)}")
    return value


def _set(rec: Any, name: str, value: Any) -> None:
    # Frozen dataclasses forbid normal assignment; normalising (int -> float)
    # during validation is the one sanctioned mutation.
    object.__setattr__(rec, name, value)


@functools.cache
def _field_names(cls: type) -> tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]:
    """(all field names in order, the same as a set, those without a default); once per class:
    a stage reads hundreds of thousands of records."""
    fields = dataclasses.fields(cls)
    required = tuple(f.name for f in fields
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    names = tuple(f.name for f in fields)
    return names, frozenset(names), required


class Record:
    """What every record shares, generic over its dataclass fields (no record overrides these).

    ``to_dict()``: the fields in declaration order, lists and dicts copied (``dataclasses.asdict``).
    ``from_dict(d, where)``: unknown keys rejected, missing required fields named, then the
    record is built (``__post_init__`` validates); any RecordError is re-reported at ``where``,
    which defaults to the class name.
    """

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any], where: str | None = None) -> R:
        where = cls.__name__ if where is None else where
        if not isinstance(d, Mapping):
            raise RecordError(where, None, f"{cls.__name__} record must be a JSON object, got {_type_name(d)}")
        names, name_set, required = _field_names(cls)
        if not name_set.issuperset(d):
            unknown = sorted(set(d) - name_set)
            raise RecordError(where, unknown[0], f"is not a field of {cls.__name__} (fields: {', '.join(names)})")
        for name in required:
            if name not in d:
                raise RecordError(where, name, "is missing")
        try:
            return cls(**d)
        except RecordError as err:
            raise err.at(where) from None


# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt(Record):
    """An instruction to answer: a seed IFT prompt or a self-instructed one."""

    prompt_id: str
    text: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self, "prompt_id", self.prompt_id, nonempty=True)
        _check_str(self, "text", self.text, nonempty=True)
        _check_str(self, "source", self.source)
        _check_dict(self, "meta", self.meta)


@dataclass(frozen=True)
class Response(Record):
    """One sampled candidate answer to a prompt."""

    prompt_id: str
    response_id: str
    text: str
    num_tokens: int
    finish_reason: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self, "prompt_id", self.prompt_id, nonempty=True)
        _check_str(self, "response_id", self.response_id, nonempty=True)
        # Empty text is a legitimate (bad) sample; the judge should see it.
        _check_str(self, "text", self.text)
        _check_int(self, "num_tokens", self.num_tokens, minimum=0)
        _check_str(self, "finish_reason", self.finish_reason, nonempty=True)
        _check_dict(self, "meta", self.meta)


@dataclass(frozen=True)
class Judgement(Record):
    """The judge's verdicts on one response: k sampled outputs, their parsed
    scores (None = parse failure, never 0) and the mean of the successes."""

    prompt_id: str
    response_id: str
    sample_scores: list[float | None]
    raw_outputs: list[str]
    failure_reasons: list[str | None]
    mean_score: float | None

    def __post_init__(self) -> None:
        _check_str(self, "prompt_id", self.prompt_id, nonempty=True)
        _check_str(self, "response_id", self.response_id, nonempty=True)
        scores = [
            _check_float(self, f"sample_scores[{i}]", s, optional=True)
            for i, s in enumerate(_check_list(self, "sample_scores", self.sample_scores))
        ]
        _set(self, "sample_scores", scores)
        for i, raw in enumerate(_check_list(self, "raw_outputs", self.raw_outputs)):
            _check_str(self, f"raw_outputs[{i}]", raw)
        for i, reason in enumerate(_check_list(self, "failure_reasons", self.failure_reasons)):
            if reason is not None:
                _check_str(self, f"failure_reasons[{i}]", reason, nonempty=True)
        self._check_consistency(scores)

    def _check_consistency(self, scores: list[float | None]) -> None:
        n = len(scores)
        if len(self.raw_outputs) != n or len(self.failure_reasons) != n:
            raise RecordError(
                "Judgement", "sample_scores",
                f"has {n} entries but raw_outputs has {len(self.raw_outputs)} "
                f"and failure_reasons has {len(self.failure_reasons)}; they must match",
            )
        for i, (s, reason) in enumerate(zip(scores, self.failure_reasons)):
            # Exactly one of (score, reason) per sample: a failed sample with no
            # reason, or a scored one with a reason, means a writer bug.
            if (s is None) == (reason is None):
                raise RecordError(
                    "Judgement", f"failure_reasons[{i}]",
                    "must be null when the sample has a score and a string when it does not",
                )
        ok = [s for s in scores if s is not None]
        mean = _check_float(self, "mean_score", self.mean_score, optional=True)
        if not ok and mean is not None:
            raise RecordError("Judgement", "mean_score", "must be null when every sample failed")
        if ok and (mean is None or not math.isclose(mean, sum(ok) / len(ok), rel_tol=1e-9, abs_tol=1e-9)):
            raise RecordError(
                "Judgement", "mean_score",
                f"must equal the mean of the non-null sample_scores ({sum(ok) / len(ok)!r}), got {mean!r}",
            )
        _set(self, "mean_score", mean)

    @property
    def num_failed(self) -> int:
        return sum(s is None for s in self.sample_scores)


@dataclass(frozen=True)
class PreferencePair(Record):
    """One DPO training example: the best and worst judged responses to a prompt.

    The response ids are optional provenance so a pair can be traced back to
    its responses and judgements.
    """

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    chosen_response_id: str | None = None
    rejected_response_id: str | None = None

    def __post_init__(self) -> None:
        _check_str(self, "prompt_id", self.prompt_id, nonempty=True)
        _check_str(self, "prompt", self.prompt, nonempty=True)
        _check_str(self, "chosen", self.chosen)
        _check_str(self, "rejected", self.rejected)
        chosen = _check_float(self, "chosen_score", self.chosen_score)
        rejected = _check_float(self, "rejected_score", self.rejected_score)
        _set(self, "chosen_score", chosen)
        _set(self, "rejected_score", rejected)
        # A tied or inverted pair teaches DPO nothing or the wrong thing.
        if not chosen > rejected:  # type: ignore[operator]
            raise RecordError(
                "PreferencePair", "chosen_score",
                f"must be greater than rejected_score ({rejected!r}), got {chosen!r}",
            )
        for name in ("chosen_response_id", "rejected_response_id"):
            if getattr(self, name) is not None:
                _check_str(self, name, getattr(self, name), nonempty=True)


@dataclass(frozen=True)
class SFTExample(Record):
    """A chat-format SFT example (IFT or EFT seed); the loss covers assistant turns."""

    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        messages = _check_list(self, "messages", self.messages)
        if not messages:
            raise RecordError("SFTExample", "messages", "must not be empty")
        for i, msg in enumerate(messages):
            name = f"messages[{i}]"
            _check_dict(self, name, msg)
            if set(msg) != {"role", "content"}:
                raise RecordError("SFTExample", name, f"must have exactly the keys 'role' and 'content', got {sorted(msg)}")
            if msg["role"] not in CHAT_ROLES:
                raise RecordError("SFTExample", f"{name}.role", f"must be one of {CHAT_ROLES}, got {msg['role']!r}")
            _check_str(self, f"{name}.content", msg["content"])
        # A trailing non-assistant turn would carry no loss: always a data bug.
        if messages[-1]["role"] != "assistant":
            raise RecordError("SFTExample", "messages", "must end with an assistant turn")
        _check_dict(self, "meta", self.meta)


@dataclass(frozen=True)
class RankedPrompt(Record):
    """A prompt with human-ranked responses (EFT data); rank 0 is the best.

    Ranks must be a permutation of 0..n-1: builders renumber after filtering
    (OASST leaves gaps when ranked siblings are dropped), so "rank 0" always
    means "the human's favourite among those kept".
    """

    prompt_id: str
    prompt: str
    responses: list[str]
    human_ranks: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self, "prompt_id", self.prompt_id, nonempty=True)
        _check_str(self, "prompt", self.prompt, nonempty=True)
        responses = _check_list(self, "responses", self.responses)
        for i, r in enumerate(responses):
            _check_str(self, f"responses[{i}]", r)
        ranks = _check_list(self, "human_ranks", self.human_ranks)
        for i, r in enumerate(ranks):
            _check_int(self, f"human_ranks[{i}]", r, minimum=0)
        if len(ranks) != len(responses):
            raise RecordError(
                "RankedPrompt", "human_ranks",
                f"has {len(ranks)} entries but responses has {len(responses)}",
            )
        if len(responses) < 2:
            raise RecordError("RankedPrompt", "responses", "must hold at least 2 responses to rank")
        if sorted(ranks) != list(range(len(ranks))):
            raise RecordError("RankedPrompt", "human_ranks", f"must be a permutation of 0..{len(ranks) - 1}, got {ranks}")
        _check_dict(self, "meta", self.meta)
