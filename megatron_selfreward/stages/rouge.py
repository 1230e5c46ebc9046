"""ROUGE-L near-duplicate search for Self-Instruct's similarity filter, at paper scale.

Self-Instruct drops a new instruction whose ROUGE-L F-measure with any existing instruction is
above 0.7 (strictly: `if max(rouge_scores) > 0.7: continue`), scored by Google's `rouge-score`
(`RougeScorer(["rougeL"], use_stemmer=False)`). Comparing every candidate with every pool member
is quadratic, so the pairs are scored in C++ by rapidfuzz, many at a time and on several threads:

- words become single characters (one code point per distinct token), so a token sequence is a
  `str` and rapidfuzz's bit-parallel LCS runs on it;
- rapidfuzz's Indel similarity 1 - (m + n - 2 LCS) / (m + n) is exactly ROUGE-L's
  F = 2 LCS / (m + n) (precision LCS/m, recall LCS/n, beta 1), so its `score_cutoff` prunes pairs
  that cannot reach the threshold without computing their LCS;
- members are kept by token count: F <= 2 min(m, n) / (m + n), so a length-m candidate is only
  compared with lengths that could pass (for 0.7: from 0.54 m to 1.86 m);
- a pair whose score is within 1e-9 of the threshold is decided again with rouge-score's own
  floating-point formula on the exact LCS, so a tie (F == 0.7 as a fraction) goes the same way
  as in rouge-score.

The pure-Python `lcs_length` / `rouge_l_f` stay as the readable definition.
"""

from __future__ import annotations

import re
from collections import defaultdict
from itertools import chain
from typing import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel, LCSseq

_TOKEN = re.compile(r"[a-z0-9]+")
# Rapidfuzz's scores are within a few ulps of the exact fraction; anything this close to the
# threshold is re-decided with rouge-score's arithmetic.
_TIE_MARGIN = 1e-9
_MAX_SCORES = 1 << 22  # scores per rapidfuzz call (float64: 32 MiB)
_SURROGATES = range(0xD800, 0xE000)  # not characters: token ids skip them


def _char(token_id: int) -> str:
    return chr(token_id if token_id < _SURROGATES.start else token_id + len(_SURROGATES))


def _code(char: str) -> int:
    point = ord(char)
    return point if point < _SURROGATES.start else point - len(_SURROGATES)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming, token for token.

    It lower-cases with `str.lower()` (so "\u212a" (Kelvin) becomes "k" and "\u0130" becomes "i" +
    a combining dot), replaces every run of characters outside [a-z0-9] by a space and keeps the
    non-empty [a-z0-9]+ pieces: exactly the maximal [a-z0-9] runs of the lower-cased text.
    """
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def f_measure(lcs: int, len_a: int, len_b: int) -> float:
    """ROUGE-L F from the LCS and the two token counts, in rouge-score's floating-point steps.

    Symmetric bit for bit: 2 * p * r is (2 * p) * r, a single rounding of the same real number
    either way round, and p + r commutes.
    """
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len_a, lcs / len_b
    return 2 * precision * recall / (precision + recall)


def rouge_l_f(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F-measure (beta = 1) between two token lists; 0 when either is empty."""
    return f_measure(lcs_length(candidate, reference), len(candidate), len(reference))


def filter_threads() -> int:
    """Threads for the pairwise scoring: as many as torch's intra-op pool, which
    `megatron_selfreward.threads.configure` sizes from what this process may use (affinity
    mask, cgroup quota, Slurm, `executor.cpu_threads`)."""
    import torch

    return max(1, torch.get_num_threads())


class RougeLIndex:
    """Token sequences, and the question: does a new one score ROUGE-L F > threshold with any?"""

    # Code points available to name tokens; past this many distinct tokens, sequences become
    # lists of ints (exact too, slower).
    max_codes = 0x110000 - len(_SURROGATES)

    def __init__(self, threshold: float, workers: int | None = None) -> None:
        if not 0.0 <= threshold:
            raise ValueError(f"ROUGE-L threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.workers = workers or filter_threads()
        self._codes: dict[str, int] = {}
        self._as_ints = False
        self._by_len: dict[int, list] = defaultdict(list)  # token count -> encoded members
        self._windows: dict[int, list[int]] = {}
        self._size = 0
        self.pairs_scored = 0  # handed to rapidfuzz, after the length windows (for benchmarks)

    def __len__(self) -> int:
        return self._size

    def encode(self, token_lists: Sequence[Sequence[str]]) -> list[str | list[int]]:
        """The sequences as rapidfuzz inputs, all in the same representation as the members."""
        codes = self._codes
        for tokens in token_lists:
            for token in tokens:
                if token not in codes:
                    codes[token] = len(codes)
        if len(codes) > self.max_codes and not self._as_ints:
            self._switch_to_ints()
        if self._as_ints:
            return [[codes[t] for t in tokens] for tokens in token_lists]
        return ["".join(map(_char, map(codes.__getitem__, tokens))) for tokens in token_lists]

    def _switch_to_ints(self) -> None:
        self._as_ints = True
        for n, members in self._by_len.items():
            self._by_len[n] = [[_code(c) for c in seq] for seq in members]

    def add(self, tokens: Sequence[str]) -> None:
        self.add_encoded(self.encode([tokens])[0])

    def add_encoded(self, seq: str | list[int]) -> None:
        if not seq:
            return  # F is 0 against an empty sequence: it can never be similar
        if len(seq) not in self._by_len:
            self._windows.clear()
        self._by_len[len(seq)].append(seq)
        self._size += 1

    def _window(self, m: int) -> list[int]:
        """Member lengths n that can reach the threshold: 2 min(m, n) / (m + n) >= threshold."""
        if m not in self._windows:
            bound = self.threshold - _TIE_MARGIN
            self._windows[m] = sorted(n for n in self._by_len if 2 * min(m, n) >= bound * (m + n))
        return self._windows[m]

    def _scores(self, queries: list, choices: list) -> np.ndarray:
        # Pairs below the cutoff come back as 0 without their LCS being computed.
        self.pairs_scored += len(queries) * len(choices)
        return process.cdist(queries, choices, scorer=Indel.normalized_similarity, dtype=np.float64,
                             score_cutoff=max(0.0, self.threshold - _TIE_MARGIN), workers=self.workers)

    def _above(self, queries: list, choices: list, scores: np.ndarray) -> np.ndarray:
        """Which (query, choice) pairs have F > threshold, given rapidfuzz's scores for them."""
        above = scores > self.threshold + _TIE_MARGIN
        for r, c in zip(*np.nonzero((scores > 0) & (np.abs(scores - self.threshold) <= _TIE_MARGIN))):
            a, b = queries[r], choices[c]
            above[r, c] = f_measure(LCSseq.similarity(a, b), len(a), len(b)) > self.threshold
        return above

    def similar(self, queries: Sequence[str | list[int]]) -> list[bool]:
        """For each encoded query: is it above the threshold with at least one member?"""
        out = [False] * len(queries)
        rows_by_len: dict[int, list[int]] = defaultdict(list)
        for i, seq in enumerate(queries):
            if seq:
                rows_by_len[len(seq)].append(i)
        for m, rows in rows_by_len.items():
            choices = list(chain.from_iterable(self._by_len[n] for n in self._window(m)))
            if not choices:
                continue
            step = max(1, _MAX_SCORES // len(choices))  # bounds the score matrix's memory
            for start in range(0, len(rows), step):
                part = rows[start:start + step]
                group = [queries[i] for i in part]
                for i, hit in zip(part, self._above(group, choices, self._scores(group, choices)).any(axis=1)):
                    out[i] = bool(hit)
        return out

    def similar_pairs(self, seqs: Sequence[str | list[int]]) -> list[list[int]]:
        """For each encoded sequence i, the earlier ones j < i it is above the threshold with."""
        out: list[list[int]] = [[] for _ in seqs]
        live = [i for i, seq in enumerate(seqs) if seq]
        if len(live) < 2:
            return out
        group = [seqs[i] for i in live]
        above = np.tril(self._above(group, group, self._scores(group, group)), k=-1)
        for r, c in zip(*np.nonzero(above)):
            out[live[r]].append(live[c])
        return out
