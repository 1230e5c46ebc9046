"""The paper's seed recipes (section 2) from a user-supplied Open Assistant export.

Input: an OASST ``*.trees.jsonl`` or ``*.trees.jsonl.gz`` file, one message tree per line
(``{"message_tree_id", "tree_state", "prompt": {"text", "lang", "replies": [...]}}``, replies
carrying ``rank``, 0 = best, or null when unranked). Read by streaming: a 1 GB export is never
held in memory, only the first turns that survive the filters.

- IFT  (paper 2.1): English first turns, the human rank-0 reply only.
- Ranked (paper 2.2 step 1): English prompts with >= 2 ranked first-turn replies.
- EFT  (paper 2.2 steps 2-5): ``build_eft`` turns ranked prompts plus SFT-baseline judge outputs
  into judge-training examples, keeping a prompt only when its scores agree with the humans.
- Seed: ``load_oasst_seed`` (the ``prepare_seed`` stage with ``data.oasst_export``) and
  ``build_oasst_seed_dir`` (``tools/build_oasst_seed.py``, ``selfreward seed oasst``) assemble IFT
  + ranked prompts with held-out eval prompts and compare the sizes with the paper's.

Overlap policy (the paper: IFT and EFT prompts do not overlap; it does not say how).
Every usable prompt goes to exactly one side, decided by a hash of its normalised text:
``IFT_FRACTION`` (0.6) of prompts with >= 2 usable ranked replies become IFT, the rest become
ranked/EFT; a prompt with a single usable ranked reply can only be IFT. Hashing the text rather
than the tree id keeps duplicate prompts (OASST has many "hello"s) on one side, and within a side
duplicates are dropped. 0.6 matches the paper's proportions: 3,200 IFT vs 1,630 + 541 = 2,171
EFT prompts (3,200 / 5,371 = 0.596). Because the assignment is a pure function of the prompt,
``build_ift`` and ``build_ranked`` can run in separate passes and still never overlap.

Filters on the first turn: tree_state must be ``ready_for_export`` when present (other states
have incomplete rankings), the prompt must be English, not deleted and not failed in review;
replies must be assistant turns in English, not deleted, not failed in review, ranked and
non-empty. If two kept replies share a rank the human order is not strict, so the prompt is
dropped (``tied_human_ranks``). IFT takes the reply whose OASST rank is 0; if that reply was
filtered out the prompt is skipped rather than promoting the runner-up.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from megatron_selfreward.data.seed import (
    Seed,
    SeedError,
    load_builtin_seed,
    normalize_instruction,
    write_seed_dir,
)
# Line numbers let a shape error in a 1 GB export be located.
from megatron_selfreward.io import JsonlError, PathLike, iter_jsonl_numbered
from megatron_selfreward.judging.parse import parse_score
from megatron_selfreward.judging.prompt import render_judge_prompt
from megatron_selfreward.records import Prompt, RankedPrompt, SFTExample

__all__ = [
    "IFT_FRACTION",
    "READY_STATE",
    "FirstTurn",
    "RankedReply",
    "EftStats",
    "iter_trees",
    "first_turn",
    "assign_side",
    "build_ift",
    "build_ranked",
    "build_seed",
    "order_agreement",
    "rebalance_scores",
    "build_eft",
    "PAPER_SIZES",
    "load_oasst_seed",
    "describe_sizes",
    "build_oasst_seed_dir",
    "describe_build",
]

log = logging.getLogger(__name__)

IFT_FRACTION = 0.6
READY_STATE = "ready_for_export"
ENGLISH = "en"

# Rejection reasons of build_eft, as stats keys.
PARSE_FAILURE = "parse_failure"
TIED_SCORES = "tied_scores"
DISAGREES = "disagrees_with_human"


@dataclass(frozen=True)
class RankedReply:
    """A usable first-turn reply; ``rank`` is OASST's (0 = best, gaps possible after filtering)."""

    message_id: str
    text: str
    rank: int


@dataclass(frozen=True)
class FirstTurn:
    """An English prompt and its usable ranked replies, in tree order."""

    tree_id: str
    prompt_message_id: str
    prompt: str
    replies: list[RankedReply]


# ---------------------------------------------------------------------------
# Reading


def _shape_problem(tree: dict) -> str | None:
    """What is wrong with a tree's first turn, or None. Deeper turns are never read."""
    prompt = tree.get("prompt")
    if not isinstance(prompt, dict):
        if "message_id" in tree and "parent_id" in tree:
            return "this is a flat message record; pass the *.trees.jsonl(.gz) export instead"
        return "expected an OASST message tree with a 'prompt' object"
    if not isinstance(prompt.get("text"), str):
        return "prompt.text must be a string"
    if not (tree.get("message_tree_id") or prompt.get("message_id")):
        return "the tree has neither message_tree_id nor prompt.message_id (needed to split it)"
    replies = prompt.get("replies", [])
    if not isinstance(replies, list):
        return "prompt.replies must be a list"
    for i, reply in enumerate(replies):
        if not isinstance(reply, dict):
            return f"prompt.replies[{i}] must be an object"
        if not isinstance(reply.get("text"), str):
            return f"prompt.replies[{i}].text must be a string"
        rank = reply.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            return f"prompt.replies[{i}].rank must be a non-negative integer or null, got {rank!r}"
    return None


def iter_trees(path: PathLike) -> Iterator[dict]:
    """Stream the trees of an OASST export (.jsonl or .jsonl.gz).

    Raises JsonlError naming the file and line for invalid JSON or a malformed first turn.
    """
    for line_no, tree in iter_jsonl_numbered(path):
        problem = _shape_problem(tree)
        if problem is not None:
            raise JsonlError(path, line_no, problem)
        yield tree


# ---------------------------------------------------------------------------
# First-turn selection


def _bump(stats: Counter | None, key: str) -> None:
    if stats is not None:
        stats[key] += 1


def _message_ok(msg: dict, stats: Counter | None, prefix: str) -> bool:
    if msg.get("deleted"):
        _bump(stats, f"{prefix}_deleted")
        return False
    # review_result is null while a review is pending; only an explicit failure rejects.
    if msg.get("review_result") is False:
        _bump(stats, f"{prefix}_failed_review")
        return False
    # A message without a language tag is not known to be English.
    if msg.get("lang") != ENGLISH:
        _bump(stats, f"{prefix}_not_english")
        return False
    if not msg.get("text", "").strip():
        _bump(stats, f"{prefix}_empty")
        return False
    return True


def _usable_replies(prompt: dict, stats: Counter | None) -> list[RankedReply]:
    kept = []
    for reply in prompt.get("replies", []):
        if reply.get("role", "assistant") != "assistant" or not _message_ok(reply, stats, "reply"):
            continue
        if reply.get("rank") is None:
            _bump(stats, "reply_unranked")
            continue
        kept.append(RankedReply(str(reply.get("message_id", "")), reply["text"].strip(), reply["rank"]))
    return kept


def first_turn(tree: dict, stats: Counter | None = None) -> FirstTurn | None:
    """The tree's usable English first turn, or None (the reason is counted in ``stats``)."""
    state = tree.get("tree_state")
    if state is not None and state != READY_STATE:
        _bump(stats, "tree_not_ready")
        return None
    prompt = tree["prompt"]
    if not _message_ok(prompt, stats, "prompt"):
        return None
    replies = _usable_replies(prompt, stats)
    if not replies:
        _bump(stats, "no_ranked_reply")
        return None
    ranks = [r.rank for r in replies]
    if len(set(ranks)) != len(ranks):
        _bump(stats, "tied_human_ranks")
        return None
    prompt_message_id = str(prompt.get("message_id", ""))
    tree_id = str(tree.get("message_tree_id") or prompt_message_id)
    if not tree_id:
        raise ValueError("OASST tree has neither message_tree_id nor prompt.message_id")
    return FirstTurn(tree_id, prompt_message_id, prompt["text"].strip(), replies)


def _unit_interval(text: str) -> float:
    digest = hashlib.sha256(f"oasst-side:{normalize_instruction(text)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_side(turn: FirstTurn, ift_fraction: float = IFT_FRACTION) -> str:
    """``"ift"`` or ``"ranked"``: the one seed set this prompt may feed (see module docstring)."""
    if not 0.0 <= ift_fraction <= 1.0:
        raise ValueError(f"ift_fraction must be in [0, 1], got {ift_fraction}")
    if len(turn.replies) < 2:
        return "ift"
    return "ift" if _unit_interval(turn.prompt) < ift_fraction else "ranked"


def _ift_example(turn: FirstTurn) -> SFTExample | None:
    best = [r for r in turn.replies if r.rank == 0]
    if not best:
        return None
    return SFTExample(
        messages=[{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": best[0].text}],
        meta={"source": "oasst", "message_tree_id": turn.tree_id,
              "prompt_message_id": turn.prompt_message_id, "reply_message_id": best[0].message_id},
    )


def _ranked_prompt(turn: FirstTurn) -> RankedPrompt:
    # Renumber to 0..n-1: filtering leaves gaps, and rank 0 must mean "best of those kept".
    dense = {rank: i for i, rank in enumerate(sorted(r.rank for r in turn.replies))}
    return RankedPrompt(
        prompt_id=f"oasst-{turn.tree_id}",
        prompt=turn.prompt,
        responses=[r.text for r in turn.replies],
        human_ranks=[dense[r.rank] for r in turn.replies],
        meta={"source": "oasst", "message_tree_id": turn.tree_id,
              "reply_message_ids": [r.message_id for r in turn.replies],
              "oasst_ranks": [r.rank for r in turn.replies]},
    )


def _sorted_trees(
    trees: Iterable[dict], ift_fraction: float, stats: Counter | None
) -> Iterator[tuple[str, SFTExample | RankedPrompt]]:
    """(side, record) for each usable tree, first occurrence of each prompt text only."""
    seen: set[str] = set()
    for tree in trees:
        turn = first_turn(tree, stats)
        if turn is None:
            continue
        key = normalize_instruction(turn.prompt)
        if key in seen:
            _bump(stats, "duplicate_prompt")
            continue
        seen.add(key)
        side = assign_side(turn, ift_fraction)
        if side == "ranked":
            yield side, _ranked_prompt(turn)
            continue
        example = _ift_example(turn)
        if example is None:
            _bump(stats, "ift_best_reply_filtered")
            continue
        yield side, example


def build_seed(
    trees: Iterable[dict], ift_fraction: float = IFT_FRACTION, stats: Counter | None = None
) -> tuple[list[SFTExample], list[RankedPrompt]]:
    """IFT examples and ranked prompts in one pass (e.g. over ``iter_trees(path)``).

    ``stats``, when given, accumulates a count per skip reason plus the output sizes.
    """
    ift: list[SFTExample] = []
    ranked: list[RankedPrompt] = []
    for side, record in _sorted_trees(trees, ift_fraction, stats):
        (ift if side == "ift" else ranked).append(record)  # type: ignore[arg-type]
    if stats is not None:
        stats["ift_examples"] += len(ift)
        stats["ranked_prompts"] += len(ranked)
    return ift, ranked


def build_ift(
    trees: Iterable[dict], ift_fraction: float = IFT_FRACTION, stats: Counter | None = None
) -> list[SFTExample]:
    """The paper's IFT seed: English first turns, human rank-0 reply only."""
    return build_seed(trees, ift_fraction, stats)[0]


def build_ranked(
    trees: Iterable[dict], ift_fraction: float = IFT_FRACTION, stats: Counter | None = None
) -> list[RankedPrompt]:
    """English prompts with >= 2 ranked first-turn replies, none of them an IFT prompt."""
    return build_seed(trees, ift_fraction, stats)[1]


# ---------------------------------------------------------------------------
# EFT: judge targets that agree with the humans, rebalanced


@dataclass
class EftStats:
    """What ``build_eft`` kept and why it dropped the rest."""

    prompts_in: int = 0
    prompts_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    parse_failures: dict[str, int] = field(default_factory=dict)
    examples_before_rebalance: int = 0
    dropped_by_rebalance: int = 0
    rebalance_feasible: bool = True
    score_histogram: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def order_agreement(scores: Sequence[float], human_ranks: Sequence[int]) -> str | None:
    """None when the scores order the responses exactly as the humans did (rank 0 = best).

    Otherwise ``"disagrees_with_human"`` (some pair inverted) or ``"tied_scores"`` (no inversion,
    but a tie the humans broke). Strict: the paper requires the orders to agree, and a tie is
    not agreement.
    """
    tied = False
    for i in range(len(scores)):
        for j in range(len(scores)):
            if human_ranks[i] < human_ranks[j]:
                if scores[i] < scores[j]:
                    return DISAGREES
                tied = tied or scores[i] == scores[j]
    return TIED_SCORES if tied else None


def rebalance_scores(
    scores: Sequence[float], max_bucket_fraction: float, rng: random.Random
) -> tuple[list[int], bool]:
    """Indices to keep so that no score holds more than ``max_bucket_fraction`` of the kept set.

    Only the largest buckets shrink: every bucket is capped at the largest size K for which
    ``K <= fraction * kept``. Returns (sorted kept indices, feasible). With fewer than
    ``1 / fraction`` distinct scores no cap can work; then nothing is dropped and feasible is False.
    """
    if not 0.0 < max_bucket_fraction <= 1.0:
        raise ValueError(f"max_bucket_fraction must be in (0, 1], got {max_bucket_fraction}")
    buckets: dict[float, list[int]] = {}
    for i, score in enumerate(scores):
        buckets.setdefault(score, []).append(i)
    if not buckets:
        return [], True
    frac = Fraction(max_bucket_fraction).limit_denominator(10**6)
    largest = max(len(b) for b in buckets.values())

    def fits(cap: int) -> bool:
        kept = sum(min(len(b), cap) for b in buckets.values())
        return min(largest, cap) * frac.denominator <= frac.numerator * kept

    cap = next((c for c in range(largest, 0, -1) if fits(c)), None)
    if cap is None:
        return list(range(len(scores))), False
    keep: list[int] = []
    for score in sorted(buckets):  # fixed order: the same rng state gives the same sample
        members = buckets[score]
        keep.extend(members if len(members) <= cap else rng.sample(members, cap))
    return sorted(keep), True


def _judge_prompt(
    ranked: RankedPrompt, judge_fn: Callable[[str, str], str], stats: EftStats
) -> list[tuple[SFTExample, float]] | None:
    """The prompt's (example, score) pairs if its judgements agree with the humans, else None."""
    outputs = [judge_fn(ranked.prompt, response) for response in ranked.responses]
    parsed = [parse_score(text) for text in outputs]
    failures = [p.reason for p in parsed if p.reason is not None]
    scores = [p.score for p in parsed if p.score is not None]
    reason = PARSE_FAILURE if failures else order_agreement(scores, ranked.human_ranks)
    for failure in failures:
        stats.parse_failures[failure] = stats.parse_failures.get(failure, 0) + 1
    if reason is not None:
        stats.rejected[reason] = stats.rejected.get(reason, 0) + 1
        return None
    examples = []
    for i, (response, text, score) in enumerate(zip(ranked.responses, outputs, scores)):
        example = SFTExample(
            messages=[{"role": "user", "content": render_judge_prompt(ranked.prompt, response)},
                      {"role": "assistant", "content": text}],
            meta={"source": "eft", "prompt_id": ranked.prompt_id, "response_index": i,
                  "human_rank": ranked.human_ranks[i], "score": score},
        )
        examples.append((example, score))
    return examples


def build_eft(
    ranked_train: Sequence[RankedPrompt],
    judge_fn: Callable[[str, str], str],
    rng: random.Random,
    max_bucket_fraction: float = 0.4,
) -> tuple[list[SFTExample], EftStats]:
    """EFT training examples (paper 2.2): judge every response, keep prompts whose scores agree.

    ``judge_fn(instruction, response)`` returns one judge output (in the pipeline: the SFT
    baseline sampling the Figure 2 prompt). A prompt whose outputs fail to parse, tie, or
    invert the human order contributes nothing. The kept examples are then down-sampled so no
    score exceeds ``max_bucket_fraction`` of the set (the paper's score-4 rebalancing; 0.4 is
    this project's default, the paper gives no ratio). Output order follows the input.
    """
    stats = EftStats(prompts_in=len(ranked_train))
    pairs: list[tuple[SFTExample, float]] = []
    for ranked in ranked_train:
        kept = _judge_prompt(ranked, judge_fn, stats)
        if kept is not None:
            stats.prompts_kept += 1
            pairs.extend(kept)
    stats.examples_before_rebalance = len(pairs)
    keep, stats.rebalance_feasible = rebalance_scores([s for _, s in pairs], max_bucket_fraction, rng)
    if not stats.rebalance_feasible:
        log.warning(
            "EFT rebalance: %d distinct scores cannot keep every score under %.0f%% of the set; "
            "kept all %d examples", len({s for _, s in pairs}), 100 * max_bucket_fraction, len(pairs),
        )
    examples = [pairs[i][0] for i in keep]
    stats.dropped_by_rebalance = len(pairs) - len(keep)
    histogram = Counter(f"{pairs[i][1]:g}" for i in keep)
    stats.score_histogram = {k: histogram[k] for k in sorted(histogram, key=float)}
    return examples, stats


# ---------------------------------------------------------------------------
# The paper's seed from an export, as `prepare_seed` and `tools/build_oasst_seed.py` use it

# Paper section 2, camera-ready (arXiv v1: EFT 1,775 / 531). The EFT train size counts what
# survives build_eft's agreement filter and rebalancing, so the ranked train prompts that
# prepare_seed writes are an upper bound on it, not the same quantity.
PAPER_SIZES = {"ift": 3200, "eft_train": 1630, "eft_eval": 541}


def load_oasst_seed(
    export: PathLike, eval_prompts: Sequence[Prompt], ift_fraction: float = IFT_FRACTION
) -> tuple[Seed, dict[str, int]]:
    """IFT examples and ranked prompts built from ``export`` by the paper's rules, with
    ``eval_prompts`` (OASST has no held-out instruction set) as the head-to-head prompts.

    Returns the seed and a count per skip reason (see ``first_turn``). A training prompt that
    is also an eval prompt is dropped (``eval_overlap``): the export cannot be edited like a
    seed directory, and evaluating on trained prompts would measure memorisation.
    Raises JsonlError naming the file and line for a malformed export, SeedError when the
    export yields no IFT example or fewer than 2 ranked prompts (EFT needs one to train on and
    one to evaluate).
    """
    stats: Counter = Counter()
    ift, ranked = build_seed(iter_trees(export), ift_fraction, stats)
    held_out = {normalize_instruction(p.text) for p in eval_prompts}
    kept_ift = [e for e in ift if normalize_instruction(e.messages[0]["content"]) not in held_out]
    kept_ranked = [r for r in ranked if normalize_instruction(r.prompt) not in held_out]
    stats["eval_overlap"] = len(ift) - len(kept_ift) + len(ranked) - len(kept_ranked)
    reasons = {k: v for k, v in sorted(stats.items()) if v and k not in ("ift_examples", "ranked_prompts")}
    skipped = ", ".join(f"{k} {v}" for k, v in reasons.items()) or "nothing"
    if not kept_ift:
        raise SeedError(f"{export}: no usable IFT example (an English first turn with its rank-0 "
                        f"reply, tree_state {READY_STATE}); skipped: {skipped}")
    if len(kept_ranked) < 2:
        raise SeedError(f"{export}: {len(kept_ranked)} prompt(s) with 2 or more usable ranked "
                        f"replies; EFT needs at least 2 (train and eval); skipped: {skipped}")
    ids = Counter(r.prompt_id for r in kept_ranked)
    duplicate = next((i for i, n in ids.items() if n > 1), None)
    if duplicate is not None:
        # Ids key the train/eval split and the joins between stages.
        raise SeedError(f"{export}: message_tree_id {duplicate.removeprefix('oasst-')!r} "
                        "appears more than once with different prompts")
    return Seed(ift=kept_ift, ranked=kept_ranked, eval_prompts=list(eval_prompts)), reasons


def describe_sizes(ift: int, *, ranked: int = 0, ranked_train: int | None = None,
                   eft_eval: int | None = None) -> str:
    """The built seed's sizes beside the paper's, in one line.

    With a train/eval split (prepare_seed) both sides are shown; without one (a seed directory,
    split later by ``data.eft_eval_fraction``) ``ranked`` is the total.
    """
    p = PAPER_SIZES
    head = f"{ift:,} IFT examples (paper {p['ift']:,})"
    paper_eft = f"paper after EFT filtering: {p['eft_train']:,} train / {p['eft_eval']:,} eval"
    if ranked_train is None or eft_eval is None:
        return f"{head}; {ranked:,} ranked prompts for EFT, split by data.eft_eval_fraction ({paper_eft})"
    return f"{head}; EFT ranked prompts {ranked_train:,} train / {eft_eval:,} eval ({paper_eft})"


def build_oasst_seed_dir(
    export: PathLike, out_dir: PathLike, overwrite: bool = False
) -> tuple[Seed, dict[str, int]]:
    """``load_oasst_seed`` with the built-in eval prompts, written as a seed directory that
    ``data.seed=OUT_DIR`` reads. Returns the seed and a count per skip reason.

    Raises FileNotFoundError for a missing export, FileExistsError when ``out_dir`` already
    holds seed files (unless ``overwrite``), and what ``load_oasst_seed`` raises.
    """
    if not Path(export).is_file():
        raise FileNotFoundError(f"{export}: no such file (give the Open Assistant *.trees.jsonl "
                                "or *.trees.jsonl.gz export)")
    seed, skipped = load_oasst_seed(export, load_builtin_seed().eval_prompts)
    write_seed_dir(seed, out_dir, overwrite)
    return seed, skipped


def describe_build(seed: Seed, skipped: dict[str, int]) -> str:
    """Sizes against the paper's and the skip counts of a seed built from an export."""
    reasons = ", ".join(f"{k} {v}" for k, v in skipped.items()) or "nothing"
    return (f"{describe_sizes(len(seed.ift), ranked=len(seed.ranked))}; "
            f"{len(seed.eval_prompts)} eval prompts (built-in)\nskipped: {reasons}")
