"""judge.force_score: a verdict without a parseable score is continued after the score cue."""

from __future__ import annotations

from megatron_selfreward.config import load_config
from megatron_selfreward.generation.engine import GenerationRequest, GenerationResult, Sample, SamplingParams
from megatron_selfreward.stages.respond import SCORE_CUE, force_scores
from megatron_selfreward.tokenizer import ByteTokenizer
from tests.conftest import CONFIGS

TOK = ByteTokenizer(512)


class ScriptedEngine:
    """Answers every follow-up request with the same continuation and records what it got."""

    def __init__(self, continuation: str) -> None:
        self.continuation = continuation
        self.seen: list[GenerationRequest] = []

    def generate(self, requests):
        self.seen += requests
        return [GenerationResult(r.request_id, [Sample(TOK.encode(self.continuation), [0.0], "length",
                                                        self.continuation)]) for r in requests]


def _sample(text: str, finish: str = "eos") -> Sample:
    ids = TOK.encode(text) + ([TOK.eos_token_id] if finish == "eos" else [])
    return Sample(ids, [0.0] * len(ids), finish, text)


def _cfg(*overrides: str):
    return load_config(CONFIGS / "tiny.yaml", list(overrides))


def test_only_unscored_samples_are_continued_before_their_end_of_turn():
    request = GenerationRequest("r1", TOK.encode("judge this"), SamplingParams(n=2))
    samples = {"r1": [_sample("Fine. Score: 4"), _sample("Rambling")]}
    engine = ScriptedEngine("3")
    texts, forced = force_scores(_cfg("judge.force_score=true"), engine, TOK, [request], samples)
    assert forced == 1 and texts["r1"] == ["Fine. Score: 4", "Rambling" + SCORE_CUE + "3"]
    (follow,) = engine.seen
    assert follow.prompt_token_ids == TOK.encode("judge this") + TOK.encode("Rambling") + TOK.encode(SCORE_CUE)
    assert follow.request_id == "r1-force1" and follow.params.n == 1


def test_off_by_default_and_too_long_follow_ups_are_left_as_failures():
    request = GenerationRequest("r1", TOK.encode("x" * 60), SamplingParams())
    samples = {"r1": [_sample("no score")]}
    assert load_config(None).judge.force_score is False  # the paper's judge: no forcing
    texts, forced = force_scores(_cfg("judge.force_score=false"), ScriptedEngine("3"), TOK, [request], samples)
    assert forced == 0 and texts["r1"] == ["no score"]
    texts, forced = force_scores(_cfg("judge.force_score=true", "model.max_seq_len=64"),
                                 ScriptedEngine("3"), TOK, [request], samples)
    assert forced == 0 and texts["r1"] == ["no score"]


def test_forced_score_is_one_token_among_the_valid_scores():
    from megatron_selfreward.stages.respond import FORCED_MAX_NEW_TOKENS, score_token_ids

    request = GenerationRequest("r1", TOK.encode("judge this"), SamplingParams())
    engine = ScriptedEngine("2")
    texts, forced = force_scores(_cfg("judge.force_score=true"), engine, TOK, [request],
                                 {"r1": [_sample("Rambling")]})
    (follow,) = engine.seen
    assert follow.params.max_new_tokens == 1
    assert sorted(follow.params.allowed_token_ids) == sorted(TOK.encode("012345"))
    assert texts["r1"] == ["Rambling" + SCORE_CUE + "2"]
    # A range with a two-token score ("10" is two bytes) cannot be limited to one token each:
    # the score is then sampled freely for a few tokens, and may still fail to parse.
    assert score_token_ids(TOK, 0, 10) is None
    engine = ScriptedEngine("7")
    force_scores(_cfg("judge.force_score=true", "judge.score_high=10"), engine, TOK, [request],
                 {"r1": [_sample("Rambling")]})
    assert engine.seen[0].params.allowed_token_ids == []
    assert engine.seen[0].params.max_new_tokens == FORCED_MAX_NEW_TOKENS
