"""The fast ROUGE-L filter against Google's rouge-score: tokens, F values, ties and decisions.

The reference decisions are rouge-score's own: a candidate is rejected when
`RougeScorer(["rougeL"]).score(candidate, member)["rougeL"].fmeasure > 0.7` for a member of the
growing pool (Self-Instruct's loop). To keep the reference affordable, rouge-score scores only
the pairs that could exceed 0.7 by a bound that holds for any LCS: F = 2 LCS / (m + n) and the
LCS is at most the multiset overlap of the two token lists.
"""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from rapidfuzz.distance import LCSseq

from megatron_selfreward.config import load_config
from megatron_selfreward.io import read_records, write_jsonl
from megatron_selfreward.records import Prompt, SFTExample
from megatron_selfreward.stages.prompts import Pool, run_generate_prompts
from megatron_selfreward.stages.rouge import RougeLIndex, _char, _code, f_measure, filter_threads, rouge_tokens
from tests.instruction_corpus import paraphrase, synthetic_instructions

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
THRESHOLD = 0.7
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_f(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


def dedup_key(text: str) -> str:
    return " ".join(text.split()).casefold()


EDGE_TEXTS = [
    "\u0130stanbul and \u0130ZM\u0130R",  # dotted capital I lower-cases to "i" + a combining dot
    "273 \u212aelvin is 0 \u00b0C",  # the Kelvin sign lower-cases to ASCII "k"
    "The \ufb01nancial \ufb02ow",  # ligatures stay non-ASCII
    "Stra\u00dfe, na\u00efve caf\u00e9 r\u00e9sum\u00e9 pi\u00f1ata",
    "snake_case, kebab-case & CamelCase3D; pi=3.14159",
    "\uff21\uff22\uff23 full-width, \u2167 roman, \u01c4 digraph",
    "Tabs\tand\nnewlines\r\nand  spaces",
    "emoji \U0001F600 between words\U0001F680done",
    "\u00c0\u00c9\u00ce\u00d5\u00dc accented capitals \u0391\u0392\u0393 Greek",
    "",
    "!!! ... ???",
]


def test_tokens_are_rouge_scores_default_tokenizer_exactly():
    texts = EDGE_TEXTS + synthetic_instructions(2500, seed=3)
    for text in texts:
        assert rouge_tokens(text) == SCORER._tokenizer.tokenize(text), text


def test_f_values_match_rouge_score_on_thousands_of_pairs():
    rng = random.Random(5)
    texts = synthetic_instructions(1500, seed=5)
    # Paraphrase pairs (most near the threshold) and random pairs.
    for i in range(1500):
        text = texts[i]
        for _ in range(1 + i % 3):  # 1 to 3 rounds of edits: F spread over 0.5 .. 1
            text = paraphrase(rng, text)
        texts.append(text)
    pairs = [(i, i + 1500) for i in range(1500)] + [(rng.randrange(3000), rng.randrange(3000)) for _ in range(1500)]
    index = RougeLIndex(threshold=0.0)  # no cutoff: every pair scored
    seqs = index.encode([rouge_tokens(t) for t in texts])
    expected = np.array([rouge_f(texts[i], texts[j]) for i, j in pairs])
    exact = np.array([f_measure(LCSseq.similarity(seqs[i], seqs[j]), len(seqs[i]), len(seqs[j])) for i, j in pairs])
    assert np.array_equal(exact, expected)  # the tie-breaking path: bit for bit
    scores = np.array([index._scores([seqs[i]], [seqs[j]])[0, 0] for i, j in pairs])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)  # the pruning path
    # The reference decisions below skip pairs by this bound: check it never undercuts rouge-score.
    tokens = [Counter(SCORER._tokenizer.tokenize(t)) for t in texts]
    bound = np.array([2 * sum((tokens[i] & tokens[j]).values()) / max(1, tokens[i].total() + tokens[j].total())
                      for i, j in pairs])
    assert (bound >= expected - 1e-12).all()
    near = np.abs(expected - THRESHOLD) < 0.1
    assert near.sum() > 300, "the pairs should exercise the threshold region"


def _tie_pairs() -> list[tuple[str, str]]:
    """Pairs whose ROUGE-L F is exactly 0.7 as a fraction: 20 LCS == 7 (m + n)."""
    pairs = []
    for m in range(1, 41):
        for n in range(m, 41):
            if 7 * (m + n) % 20 == 0 and (lcs := 7 * (m + n) // 20) <= m:
                shared = [f"s{k}" for k in range(lcs)]
                pairs.append((" ".join(shared + [f"a{k}" for k in range(m - lcs)]),
                              " ".join([f"b{k}" for k in range(n - lcs)] + shared)))
    return pairs


def test_exact_ties_are_decided_like_rouge_score():
    pairs = _tie_pairs()
    above = [rouge_f(a, b) > THRESHOLD for a, b in pairs]
    assert len(pairs) >= 20 and any(above) and not all(above)  # the float rounding goes both ways
    for (a, b), expected in zip(pairs, above):
        pool = Pool([b], threshold=THRESHOLD)
        assert pool.reason(a) == ("rouge_l_similar" if expected else None), (a, b)
        assert pool.screen([a]) == ["rouge_l_similar" if expected else None]


def reference_decisions(seed: list[str], candidates: list[str]) -> list[str | None]:
    """Self-Instruct's loop with rouge-score, pruned by the multiset-overlap bound."""
    vocab: dict[str, int] = {}
    tokens = [SCORER._tokenizer.tokenize(t) for t in seed + candidates]
    for toks in tokens:
        for tok in toks:
            vocab.setdefault(tok, len(vocab))
    counts = np.zeros((len(tokens), len(vocab)), dtype=np.int32)
    for row, toks in enumerate(tokens):
        for tok, c in Counter(toks).items():
            counts[row, vocab[tok]] = c
    lengths = counts.sum(axis=1)
    pool_rows = list(range(len(seed)))
    texts = seed + candidates
    exact = {dedup_key(t) for t in seed}
    out = []
    for k, text in enumerate(candidates):
        row = len(seed) + k
        if dedup_key(text) in exact:
            out.append("duplicate")
            continue
        rows = np.array(pool_rows)
        cols = np.nonzero(counts[row])[0]
        overlap = np.minimum(counts[np.ix_(rows, cols)], counts[row, cols]).sum(axis=1)
        bound = 2 * overlap / np.maximum(lengths[rows] + lengths[row], 1)
        maybe = rows[bound > THRESHOLD - 1e-9]
        if any(rouge_f(text, texts[j]) > THRESHOLD for j in maybe):
            out.append("rouge_l_similar")
        else:
            out.append(None)
            exact.add(dedup_key(text))
            pool_rows.append(row)
    return out


@pytest.fixture(scope="module")
def growing_pool_case():
    texts = synthetic_instructions(5000, seed=11, near_duplicate_share=0.35)
    seed, candidates = texts[:400], texts[400:]
    return seed, candidates, reference_decisions(seed, candidates)


def test_decisions_match_rouge_score_against_a_growing_pool(growing_pool_case):
    seed, candidates, expected = growing_pool_case
    assert len(candidates) >= 2000
    rejected = Counter(r for r in expected if r)
    # A realistic share of near-duplicates: the test is not won by accepting everything.
    assert 0.15 < rejected["rouge_l_similar"] / len(candidates) < 0.6
    pool = Pool(seed, threshold=THRESHOLD)
    pool.batch_size = 1000  # several batches: candidates also meet the pool kept by earlier ones
    assert pool.screen(candidates) == expected


def test_screen_equals_reason_then_add_one_by_one(growing_pool_case):
    seed, candidates, expected = growing_pool_case
    one_by_one = Pool(seed, threshold=THRESHOLD)
    got = []
    for text in candidates[:600]:
        got.append(one_by_one.reason(text))
        if got[-1] is None:
            one_by_one.add(text)
    assert got == expected[:600]
    whole = Pool(seed, threshold=THRESHOLD)
    assert whole.screen(candidates[:600]) == expected[:600]  # a single batch


def test_limit_turns_later_passes_into_over_quota(growing_pool_case):
    seed, candidates, expected = growing_pool_case
    limit = 50
    cut = [i for i, r in enumerate(expected) if r is None][limit]  # the first one past the limit
    pool = Pool(seed, threshold=THRESHOLD)
    pool.batch_size = 64
    got = pool.screen(candidates[:cut + 200], limit=limit)
    assert got[:cut] == expected[:cut]
    assert got.count(None) == limit and got[cut] == "over_quota"
    assert "rouge_l_similar" in got[cut:] and "over_quota" in got[cut + 1:]


def test_many_distinct_tokens_fall_back_to_int_sequences(monkeypatch, growing_pool_case):
    seed, candidates, expected = growing_pool_case
    monkeypatch.setattr(RougeLIndex, "max_codes", 300)  # switch part-way through the candidates
    pool = Pool(seed[:50], threshold=THRESHOLD)
    assert not pool.index._as_ints
    got = pool.screen(seed[50:] + candidates[:800])
    assert pool.index._as_ints
    assert got == reference_decisions(seed[:50], seed[50:] + candidates[:800])


def test_token_ids_skip_the_surrogate_code_points():
    for token_id in (0, 0xD7FF, 0xD800, RougeLIndex.max_codes - 1):
        assert _code(_char(token_id)) == token_id
    assert _char(0xD800) == "\ue000" and _char(RougeLIndex.max_codes - 1) == "\U0010ffff"


def test_threads_follow_the_cpu_affinity():
    assert filter_threads() >= 1
    assert RougeLIndex(0.7).workers == filter_threads()
    with pytest.raises(ValueError, match="threshold"):
        RougeLIndex(-0.1)


# ---------------------------------------------------------------------------------------------
# The stage: counters per reason, earlier iterations in the pool


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [0] * 10


class _Engine:
    def __init__(self, completions: list[str]) -> None:
        self.completions = list(completions)

    def generate(self, requests):
        return [SimpleNamespace(request_id=r.request_id,
                                samples=[SimpleNamespace(text=self.completions.pop(0), finish_reason="stop")])
                for r in requests]


def test_stage_counts_each_rejection_and_sees_earlier_iterations(tmp_path):
    ift = tmp_path / "ift.jsonl"
    write_jsonl(ift, [SFTExample(messages=[{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])
                      for text in ["Give three tips for staying healthy.", "Explain how a rainbow forms."]])
    earlier = tmp_path / "iter1.jsonl"
    write_jsonl(earlier, [Prompt(prompt_id="iter1-p00000", text="Describe the water cycle for a child.",
                                 source="self-instruct:iter1")])
    completions = [
        " Give three tips for staying very healthy\n10. Say hi\n11. Plot the sales numbers for me"
        "\n12. Write a short poem about the sea",
        " describe the water cycle for a small child\n10. Write a short poem about the sea!"
        "\n11. write a short  poem about the sea\n12. List five rivers in Europe\n13. Name four moons of Jupiter",
    ]
    cfg = load_config(None, ["generation.prompts.num_prompts=2", "generation.batch_size=1",
                             "model.max_seq_len=4096"])
    policy = SimpleNamespace(tokenizer=_Tokenizer(), engine=_Engine(completions))
    out = tmp_path / "prompts.jsonl"
    counts = run_generate_prompts(cfg, 2, ift, [earlier], policy, out)
    assert [p.text for p in read_records(out, Prompt)] == ["Write a short poem about the sea",
                                                             "List five rivers in Europe"]
    assert counts["candidates"] == 9 and counts["accepted"] == 2
    assert counts["rejected"] == {"blacklisted_keyword": 1, "duplicate": 1, "over_quota": 1,
                                  "rouge_l_similar": 3, "too_short": 1}
