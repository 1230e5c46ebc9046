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
instruction (the seed's and every prompt generated before, in this and earlier iterations;
rouge-score's tokens and arithmetic with Self-Instruct's strict `>`, scored in C++ a batch of
candidates at a time: stages/rouge.py).
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
from megatron_selfreward.errors import StageError
from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
from megatron_selfreward.io import read_records, write_jsonl
from megatron_selfreward.records import Prompt, SFTExample
from megatron_selfreward.stages.rouge import RougeLIndex, rouge_tokens

TEMPLATE_HEADER = "Come up with a series of tasks:\n"
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
             "map", "maps", "draw", "plot", "go to")
STOP_STRINGS = ["\n\n", "\n16", "16.", "16 ."]
_SPLIT = re.compile(r"\n\d+\s?\. ")
_BLACKLIST = [re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE) for word in BLACKLIST]


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


def _dedup_key(text: str) -> str:
    return " ".join(text.split()).casefold()


class Pool:
    """The existing instructions a new one is compared with (seed + everything generated).

    A candidate is a "duplicate" when it equals a member up to whitespace and case, else
    "rouge_l_similar" when its ROUGE-L F with some member is > `threshold` (Self-Instruct's
    strict comparison, rouge-score's tokens and arithmetic; see stages/rouge.py).
    """

    # Candidates compared with the pool in one go by `screen` (then among themselves, in order).
    batch_size = 2048

    def __init__(self, texts: Iterable[str], threshold: float) -> None:
        self.threshold = threshold
        self.exact: set[str] = set()
        self.index = RougeLIndex(threshold)
        texts = list(texts)
        self.exact.update(map(_dedup_key, texts))
        for seq in self.index.encode([rouge_tokens(t) for t in texts]):
            self.index.add_encoded(seq)

    def add(self, text: str) -> None:
        self.exact.add(_dedup_key(text))
        self.index.add(rouge_tokens(text))

    def reason(self, text: str) -> str | None:
        """Why `text` would be rejected now (None: it would be kept); the pool is unchanged."""
        if _dedup_key(text) in self.exact:
            return "duplicate"
        return "rouge_l_similar" if self.index.similar(self.index.encode([rouge_tokens(text)]))[0] else None

    def screen(self, texts: Sequence[str], limit: int | None = None) -> list[str | None]:
        """Judge `texts` in order, adding each kept one before the next is judged.

        Returns a reason per text: None for the ones added, "over_quota" for ones that passed
        after `limit` texts had been added, else "duplicate" / "rouge_l_similar". Equivalent to
        `reason` then `add` one by one; batched so the pool is scanned once per `batch_size`.
        """
        reasons: list[str | None] = []
        room = len(texts) if limit is None else limit
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            keys = [_dedup_key(t) for t in chunk]
            seqs = self.index.encode([rouge_tokens(t) for t in chunk])
            in_pool = self.index.similar(seqs)
            # Only candidates that survive the pool can be kept, so only they can block later ones.
            alive = [i for i, key in enumerate(keys) if key not in self.exact and not in_pool[i]]
            earlier = dict(zip(alive, self.index.similar_pairs([seqs[i] for i in alive])))
            kept: set[int] = set()
            for i, key in enumerate(keys):
                if key in self.exact:
                    reason = "duplicate"
                elif in_pool[i] or any(alive[j] in kept for j in earlier.get(i, ())):
                    reason = "rouge_l_similar"
                elif room <= 0:
                    reason = "over_quota"
                else:
                    reason, room = None, room - 1
                    self.exact.add(key)
                    kept.add(i)
                    self.index.add_encoded(seqs[i])
                reasons.append(reason)
        return reasons


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
        round_size = cfg.generation.batch_size or pg.num_prompts  # 0: the engine sizes its batches
        for _ in range(min(round_size, max_attempts - attempts, pg.num_prompts - len(accepted))):
            text = render_few_shot(_shots(rng, ift, before + [p.text for p in accepted], cfg))
            request = _request(cfg, policy, f"iter{iteration}-gen{attempts}", text, params)
            attempts += 1
            if request is None:
                rejected["few_shot_prompt_too_long"] += 1
            else:
                batch.append(request)
        passed = []  # candidates of this round that pass the per-instruction filters, in order
        for result in policy.engine.generate(batch) if batch else []:
            sample = result.samples[0]
            for text in split_completion(sample.text, sample.finish_reason == "length"):
                candidates += 1
                reason = reject_reason(text, pg.min_words, pg.max_words)
                if reason is None:
                    passed.append(text)
                else:
                    rejected[reason] += 1
        # Each kept candidate joins the pool before the next one is compared (pool.screen).
        for text, reason in zip(passed, pool.screen(passed, limit=pg.num_prompts - len(accepted))):
            if reason is None:
                accepted.append(Prompt(prompt_id=f"iter{iteration}-p{len(accepted):05d}", text=text,
                                       source=f"self-instruct:iter{iteration}"))
            else:
                rejected[reason] += 1
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
