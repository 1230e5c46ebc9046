"""Stage `generate_prompts` (paper section 4, step 1): new instructions, Self-Instruct style.

A fixed generator model (`generation.prompts.generator`: "self" = M_t, else a model directory)
continues an 8-shot list: 6 instructions sampled from the IFT seed + 2 sampled from the prompts
generated so far (IFT ones stand in while there are fewer than 2), shuffled, in Self-Instruct's
template for non-classification tasks:

    Come up with a series of tasks:
    1. <instruction>
    ...
    8. <instruction>
    9.

decoded at T 0.6 / top-p 0.9. The completion is split on `\\n\\d+\\s?\\. ` (Self-Instruct), and
each candidate goes through Self-Instruct's filters; every rejection is counted by reason in the
manifest: too short / too long (words), a blacklisted keyword, "Write a program", a leading
punctuation or non-ASCII character, an exact duplicate, and ROUGE-L F > 0.7 against any existing
instruction (the seed's and every prompt generated before, in this and earlier iterations).
Requests are made in rounds until `num_prompts` are accepted or `max_attempts` requests are used.
`source: seed` skips generation and draws instructions from the IFT seed instead (a documented
deviation for the random-init test model, which cannot self-instruct).

Differences from the reference implementation, on purpose: a completion cut by the token limit
loses only its last (unfinished) candidate instead of all of them (cheaper on CPU), and
instructions are not `str.capitalize()`d (that lower-cases names and acronyms).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from megatron_selfreward.config import Config
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
from megatron_selfreward.io import read_records, write_jsonl
from megatron_selfreward.records import Prompt, SFTExample
from megatron_selfreward.stages.errors import StageError

TEMPLATE_HEADER = "Come up with a series of tasks:\n"
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
             "map", "maps", "draw", "plot", "go to")
STOP_STRINGS = ["\n\n", "\n16", "16.", "16 ."]
_SPLIT = re.compile(r"\n\d+\s?\. ")
_BLACKLIST = [re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE) for word in BLACKLIST]


# ---------------------------------------------------------------------------------------------
# ROUGE-L (Lin 2004): longest common subsequence of lower-cased word tokens


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words, as rouge_score's default tokenizer (no stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_f(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F-measure (beta = 1) between two token lists; 0 when either is empty."""
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# Prompt template, parsing and filters (pure functions)


def render_few_shot(instructions: Sequence[str]) -> str:
    lines = [f"{i}. {' '.join(text.split())}\n" for i, text in enumerate(instructions, start=1)]
    return TEMPLATE_HEADER + "".join(lines) + f"{len(instructions) + 1}."


def split_completion(completion: str, truncated: bool) -> list[str]:
    """Candidate instructions from a completion of `render_few_shot(...)` (which ends in "9.")."""
    pieces = _SPLIT.split(completion)
    if truncated and pieces:
        pieces = pieces[:-1]  # the last one was cut by the token limit
    return [" ".join(p.split()) for p in pieces]


def reject_reason(text: str, min_words: int, max_words: int) -> str | None:
    """Self-Instruct's per-instruction filters; None = keep (similarity is checked separately)."""
    if not text:
        return "empty"
    words = len(text.split())
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if any(pattern.search(text) for pattern in _BLACKLIST):
        return "blacklisted_keyword"
    if text.startswith("Write a program"):
        return "write_a_program"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if not text[0].isascii():
        return "starts_with_non_ascii"
    return None


class Pool:
    """The existing instructions a new one is compared with (seed + everything generated)."""

    def __init__(self, texts: Iterable[str], threshold: float) -> None:
        self.threshold = threshold
        self.exact: set[str] = set()
        self.tokens: list[list[str]] = []
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self.exact.add(" ".join(text.split()).casefold())
        self.tokens.append(rouge_tokens(text))

    def reason(self, text: str) -> str | None:
        if " ".join(text.split()).casefold() in self.exact:
            return "duplicate"
        candidate = rouge_tokens(text)
        if any(rouge_l_f(candidate, ref) > self.threshold for ref in self.tokens):
            return "rouge_l_similar"
        return None


# ---------------------------------------------------------------------------------------------
# The stage


def _ift_instructions(ift: Sequence[SFTExample]) -> list[str]:
    return [next(m["content"] for m in ex.messages if m["role"] == "user") for ex in ift]


def _shots(rng: random.Random, ift: list[str], generated: list[str], cfg: Config) -> list[str]:
    pg = cfg.generation.prompts
    machine = rng.sample(generated, min(pg.shots_generated, len(generated)))
    human = rng.sample(ift, min(len(ift), pg.shots_ift + pg.shots_generated - len(machine)))
    shots = human + machine
    rng.shuffle(shots)
    return shots


def _seed_prompts(cfg: Config, iteration: int, ift: list[str], before: list[str], out: Path) -> dict[str, Any]:
    """`source: seed`: instructions drawn from the IFT seed, none used by an earlier iteration."""
    used = {" ".join(t.split()).casefold() for t in before}
    fresh = [t for t in ift if " ".join(t.split()).casefold() not in used]
    rng = random.Random(f"{cfg.pipeline.seed}:prompts:{iteration}")
    chosen = rng.sample(fresh, min(cfg.generation.prompts.num_prompts, len(fresh)))
    write_jsonl(out, [Prompt(prompt_id=f"iter{iteration}-p{i:05d}", text=text, source="seed-ift")
                      for i, text in enumerate(chosen)])
    return {"source": "seed", "accepted": len(chosen), "requested": cfg.generation.prompts.num_prompts}


def _request(cfg: Config, policy: Any, request_id: str, text: str, params: SamplingParams
             ) -> GenerationRequest | None:
    ids = policy.tokenizer.encode(text)
    fits = len(ids) + params.max_new_tokens <= cfg.model.max_seq_len
    return GenerationRequest(request_id, ids, params) if fits else None


def run_generate_prompts(cfg: Config, iteration: int, ift_path: Path, earlier: Sequence[Path],
                         policy: Any, out: Path) -> dict[str, Any]:
    """Write up to `num_prompts` new Prompt records to `out`; return the manifest counts."""
    pg = cfg.generation.prompts
    ift = _ift_instructions(read_records(ift_path, SFTExample))
    before = [p.text for path in earlier for p in read_records(path, Prompt)]
    if pg.source == "seed":
        return _seed_prompts(cfg, iteration, ift, before, out)
    pool = Pool(ift + before, pg.rouge_l_threshold)
    rng = random.Random(f"{cfg.pipeline.seed}:prompts:{iteration}")
    params = SamplingParams(temperature=pg.temperature, top_p=pg.top_p, max_new_tokens=pg.max_new_tokens,
                            stop_strings=STOP_STRINGS)
    max_attempts = pg.max_attempts or 4 * pg.num_prompts
    accepted: list[Prompt] = []
    rejected: Counter = Counter()
    attempts = candidates = 0
    while len(accepted) < pg.num_prompts and attempts < max_attempts:
        batch = []
        # One request per missing prompt (each yields several candidates): few wasted samples.
        for _ in range(min(cfg.generation.batch_size, max_attempts - attempts, pg.num_prompts - len(accepted))):
            text = render_few_shot(_shots(rng, ift, before + [p.text for p in accepted], cfg))
            request = _request(cfg, policy, f"iter{iteration}-gen{attempts}", text, params)
            attempts += 1
            if request is None:
                rejected["few_shot_prompt_too_long"] += 1
            else:
                batch.append(request)
        for result in policy.engine.generate(batch) if batch else []:
            sample = result.samples[0]
            for text in split_completion(sample.text, sample.finish_reason == "length"):
                candidates += 1
                reason = reject_reason(text, pg.min_words, pg.max_words) or pool.reason(text)
                if reason is None and len(accepted) < pg.num_prompts:
                    pool.add(text)
                    accepted.append(Prompt(prompt_id=f"iter{iteration}-p{len(accepted):05d}", text=text,
                                           source=f"self-instruct:iter{iteration}"))
                else:
                    rejected[reason or "over_quota"] += 1
    counts = {"source": "self_instruct", "accepted": len(accepted), "requested": pg.num_prompts,
              "attempts": attempts, "max_attempts": max_attempts,
              "attempt_cap_reached": len(accepted) < pg.num_prompts, "candidates": candidates,
              "rejected": dict(sorted(rejected.items()))}
    if not accepted:
        raise StageError(f"iteration {iteration}: the prompt generator wrote no usable instruction in "
                         f"{attempts} requests ({candidates} candidates, rejected {counts['rejected']}); "
                         "raise generation.prompts.max_attempts or use a stronger generator")
    write_jsonl(out, accepted)
    return counts
