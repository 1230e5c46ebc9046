"""Seed data: the IFT examples, human-ranked prompts and held-out eval prompts a run starts from.

A seed is three JSONL files in one directory:

- ``ift.jsonl``           SFTExample records (user turn, assistant turn): instruction-following data
- ``ranked.jsonl``        RankedPrompt records: prompts with human-ranked responses, the raw
                          material for EFT (judge) training and the reward-modelling eval split
- ``eval_prompts.jsonl``  Prompt records: held-out instructions for head-to-head evaluation

A small seed written for this project ships in ``builtin/`` so the everyday CPU path needs no
download; the paper's own seed (Open Assistant) is built by ``data.oasst`` from a user's export
into the same three files (``write_seed_dir``), and ``load_seed_dir`` reads either.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence, TypeVar

from megatron_selfreward.io import read_records, write_jsonl
from megatron_selfreward.records import Prompt, RankedPrompt, SFTExample

__all__ = [
    "IFT_FILE",
    "RANKED_FILE",
    "EVAL_PROMPTS_FILE",
    "Seed",
    "SeedError",
    "load_builtin_seed",
    "load_seed_dir",
    "write_seed_dir",
    "split_ranked",
    "normalize_instruction",
]

IFT_FILE = "ift.jsonl"
RANKED_FILE = "ranked.jsonl"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"

# What each file must hold, quoted in errors so a user can fix a seed without reading code.
_EXPECTED = {
    IFT_FILE: 'SFTExample records, one per line: {"messages": [{"role": "user", "content": ...}, '
              '{"role": "assistant", "content": ...}]}',
    RANKED_FILE: 'RankedPrompt records, one per line: {"prompt_id": ..., "prompt": ..., '
                 '"responses": [at least 2 strings], "human_ranks": [0 = best, a permutation]}',
    EVAL_PROMPTS_FILE: 'Prompt records, one per line: {"prompt_id": ..., "text": ...}',
}

R = TypeVar("R")


class SeedError(ValueError):
    """A seed directory is unusable; the message names the file and what it should hold."""


@dataclass(frozen=True)
class Seed:
    """The three seed sets of a run."""

    ift: list[SFTExample]
    ranked: list[RankedPrompt]
    eval_prompts: list[Prompt]


def normalize_instruction(text: str) -> str:
    """Case- and whitespace-insensitive form of an instruction, for overlap checks."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def _read_nonempty(path: Path, cls: type[R]) -> list[R]:
    if not path.is_file():
        raise SeedError(f"{path}: seed file not found; expected {_EXPECTED[path.name]}")
    records = read_records(path, cls)  # type: ignore[type-var]  # errors name file and line
    if not records:
        raise SeedError(f"{path}: seed file is empty; expected {_EXPECTED[path.name]}")
    return records


def _check_unique_ids(path: Path, ids: Sequence[str]) -> None:
    # Ids key the train/eval split and the joins between stages; a duplicate
    # would silently merge two prompts' judgements.
    seen: set[str] = set()
    for i, prompt_id in enumerate(ids, start=1):
        if prompt_id in seen:
            raise SeedError(f"{path}: prompt_id {prompt_id!r} appears more than once (record {i})")
        seen.add(prompt_id)


def _check_held_out(path: Path, ift: Sequence[SFTExample], eval_prompts: Sequence[Prompt]) -> None:
    # An eval prompt the model was fine-tuned on measures memorisation, not instruction following.
    trained = {normalize_instruction(m["content"]) for ex in ift for m in ex.messages if m["role"] == "user"}
    for prompt in eval_prompts:
        if normalize_instruction(prompt.text) in trained:
            raise SeedError(
                f"{path}: eval prompt {prompt.prompt_id!r} is also an instruction in {IFT_FILE}; "
                "evaluation prompts must be held out from training"
            )


def load_seed_dir(path: str | Path) -> Seed:
    """Read ``ift.jsonl``, ``ranked.jsonl`` and ``eval_prompts.jsonl`` from ``path``.

    Raises SeedError for a missing or empty file, a duplicate prompt id or an eval prompt that
    also appears in the IFT data; JsonlError / RecordError (naming file and line) for a bad line.
    """
    root = Path(path)
    if not root.is_dir():
        raise SeedError(f"{root}: seed directory not found; expected {IFT_FILE}, {RANKED_FILE} and {EVAL_PROMPTS_FILE}")
    ift = _read_nonempty(root / IFT_FILE, SFTExample)
    ranked = _read_nonempty(root / RANKED_FILE, RankedPrompt)
    eval_prompts = _read_nonempty(root / EVAL_PROMPTS_FILE, Prompt)
    _check_unique_ids(root / RANKED_FILE, [r.prompt_id for r in ranked])
    _check_unique_ids(root / EVAL_PROMPTS_FILE, [p.prompt_id for p in eval_prompts])
    _check_held_out(root / EVAL_PROMPTS_FILE, ift, eval_prompts)
    return Seed(ift=ift, ranked=ranked, eval_prompts=eval_prompts)


def write_seed_dir(seed: Seed, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``seed`` as the three files ``load_seed_dir`` reads (each atomically).

    Raises FileExistsError when ``path`` already holds one of them and ``overwrite`` is False:
    a seed directory is often edited by hand (its eval prompts replaced), and a rebuild must
    not silently undo that.
    """
    root = Path(path)
    present = [name for name in (IFT_FILE, RANKED_FILE, EVAL_PROMPTS_FILE) if (root / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{root} already holds {', '.join(present)}; pass --overwrite to replace")
    write_jsonl(root / RANKED_FILE, seed.ranked)
    write_jsonl(root / EVAL_PROMPTS_FILE, seed.eval_prompts)
    write_jsonl(root / IFT_FILE, seed.ift)
    return root


def load_builtin_seed() -> Seed:
    """The seed shipped in the package (``builtin/``; see its README for provenance and licence)."""
    builtin = resources.files(__package__).joinpath("builtin")
    # as_file: a real directory path (for a zipped install this needs Python >= 3.12).
    with resources.as_file(builtin) as directory:
        return load_seed_dir(directory)


def _unit_hash(seed: int, prompt_id: str) -> int:
    # sha256, not hash(): Python salts str hashes per process, and the split
    # must be identical on every rank, run and machine.
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode("utf-8")).digest()[:8], "big")


def split_ranked(
    ranked: Sequence[RankedPrompt], eval_fraction: float, seed: int = 0
) -> tuple[list[RankedPrompt], list[RankedPrompt]]:
    """Split ranked prompts into (train, eval) by a hash of each prompt id.

    The ``round(n * eval_fraction)`` prompts with the smallest hashes go to eval, so the split
    depends only on the set of ids and ``seed``, never on file order. With 0 < fraction < 1 and
    at least two prompts, both sides get at least one prompt. Input order is kept on each side.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    ids = [r.prompt_id for r in ranked]
    if len(set(ids)) != len(ids):
        raise ValueError("split_ranked: prompt ids must be unique")
    n = len(ranked)
    n_eval = round(n * eval_fraction)
    if 0.0 < eval_fraction < 1.0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    by_hash = sorted(ids, key=lambda pid: (_unit_hash(seed, pid), pid))
    eval_ids = set(by_hash[:n_eval])
    train = [r for r in ranked if r.prompt_id not in eval_ids]
    held_out = [r for r in ranked if r.prompt_id in eval_ids]
    return train, held_out
