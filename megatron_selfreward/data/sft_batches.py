"""SFT data: chat examples -> token ids with a target mask -> padded or packed micro-batches.

A conversation is rendered in the model's chat format (`tokenizer.render_chat`) one turn at a
time and each piece is tokenised on its own, so the prompt tokens are exactly what generation
feeds the model (`render_chat(..., add_generation_prompt=True)` then `encode`). The loss covers
the assistant turns only (their text and end-of-turn marker), never the prompt or the role
headers.

Over-long examples: the first `seq_len` tokens are kept (the prompt is kept whole and the
response is cut); an example whose prompt alone fills `seq_len`, so that no target token is
left, is dropped. Both are counted, logged and recorded in the stage manifest; a data set that
loses every example is refused with a message naming its file.

Batches follow megatron's GPT layout: `tokens` and `labels` of the same length, labels[i] =
tokens[i+1], `loss_mask` on labels. With packing, several examples share a row; a
block-diagonal causal `attention_mask` keeps attention inside each example, and since RoPE
depends only on relative positions inside the block, a packed example computes what it would
alone (megatron's GPTModel derives RoPE angles from the row position, not from `position_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from megatron_selfreward.records import SFTExample
from megatron_selfreward.tokenizer import Message, Tokenizer, render_chat


@dataclass(frozen=True)
class TokenizedSample:
    tokens: list[int]
    targets: list[int]  # 1 where the token is a target (predicted from the tokens before it)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class LengthStats:
    """What happened to over-long examples while preparing a data set."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_indices: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"kept": self.kept, "truncated": self.truncated, "dropped": self.dropped}

    def describe(self, section: str, seq_len: int) -> str:
        """One log line: what `<section>.seq_len` did to the data set."""
        noun = "pairs" if section == "dpo" else "examples"
        total = self.kept + self.dropped
        return (f"{section} data: {self.kept} of {total} {noun} kept; dropped {self.dropped} whose prompt "
                f"alone fills {section}.seq_len={seq_len} tokens; cut {self.truncated} to fit")


def check_not_empty(stats: LengthStats, section: str, seq_len: int, source: str | None) -> None:
    """Refuse a data set that leaves nothing to train on, naming where it came from."""
    if stats.kept:
        return
    from megatron_selfreward.errors import StageError

    where = source or "the training data"
    noun = "pairs" if section == "dpo" else "examples"
    if not stats.dropped:
        raise StageError(f"{where}: empty, no {noun} to train on")
    raise StageError(f"{where}: all {stats.dropped} {noun} were dropped, each prompt alone fills "
                     f"{section}.seq_len={seq_len} tokens: nothing left to train on (raise "
                     f"{section}.seq_len or shorten the prompts)")


def conversation_segments(messages: Sequence[Message], template: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces, in order.

    Each assistant turn is split into its header (the generation prompt: not a target) and its
    body (content + end of turn: the target).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        bounds = []
        if message["role"] == "assistant":
            bounds.append((render_chat(messages[:k], template, add_generation_prompt=True), False))
        bounds.append((render_chat(messages[: k + 1], template, add_generation_prompt=False),
                       message["role"] == "assistant"))
        for text, is_target in bounds:
            if not text.startswith(done):
                raise ValueError(f"chat template {template!r} does not render turns as prefixes")
            if len(text) > len(done):
                pieces.append((text[len(done):], is_target))
            done = text
    return pieces


def tokenize_conversation(
    messages: Sequence[Message], tokenizer: Tokenizer, template: str
) -> TokenizedSample:
    tokens: list[int] = []
    targets: list[int] = []
    for text, is_target in conversation_segments(messages, template):
        ids = tokenizer.encode(text)
        tokens += ids
        targets += [int(is_target)] * len(ids)
    return TokenizedSample(tokens, targets)


def fit_to_length(sample: TokenizedSample, seq_len: int) -> tuple[TokenizedSample | None, bool]:
    """(sample cut to `seq_len` tokens or None when no target token survives, was it cut)."""
    if len(sample) <= seq_len:
        return (sample if any(sample.targets) else None), False
    cut = TokenizedSample(sample.tokens[:seq_len], sample.targets[:seq_len])
    return (cut if any(cut.targets) else None), True


def prepare_sft(
    examples: Sequence[SFTExample], tokenizer: Tokenizer, template: str, seq_len: int
) -> tuple[list[TokenizedSample], LengthStats]:
    """Tokenise every example; truncate or drop over-long ones (counted in the stats)."""
    return fit_all(examples, lambda example: fit_to_length(
        tokenize_conversation(example.messages, tokenizer, template), seq_len))


def fit_all(records: Sequence[Any], fit: Callable[[Any], tuple[Any, bool]]) -> tuple[list, LengthStats]:
    """`fit(record) -> (fitted or None when dropped, was it cut)` over `records`: the fitted
    ones in order, and the kept, dropped (with their indices) and cut counts."""
    stats = LengthStats()
    out = []
    for i, record in enumerate(records):
        fitted, cut = fit(record)
        if fitted is None:
            stats.dropped += 1
            stats.dropped_indices.append(i)
            continue
        stats.kept += 1
        stats.truncated += int(cut)
        out.append(fitted)
    return out, stats


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _shifted(sample: TokenizedSample, pad_id: int) -> tuple[list[int], list[int]]:
    """Labels and loss mask aligned with the tokens: position i predicts token i+1."""
    labels = sample.tokens[1:] + [pad_id]
    mask = sample.targets[1:] + [0]
    return labels, mask


def padded_batch(samples: Sequence[TokenizedSample], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows: causal attention alone keeps real tokens from seeing the padding."""
    b = len(samples)
    tokens = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.float)
    for row, sample in enumerate(samples):
        n = len(sample)
        lab, msk = _shifted(sample, pad_id)
        tokens[row, :n] = torch.tensor(sample.tokens)
        labels[row, :n] = torch.tensor(lab)
        mask[row, :n] = torch.tensor(msk, dtype=torch.float)
    positions = torch.arange(length).unsqueeze(0).expand(b, length).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions}


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit packing of sample lengths into rows of at most `seq_len` tokens (indices)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, 1, s, s] bool mask, True where attention is NOT allowed."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    return ~(same_doc & causal).unsqueeze(1)


def packed_batch(
    rows: Sequence[Sequence[TokenizedSample]], length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows of several samples each, with per-document positions and a block-diagonal mask."""
    b = len(rows)
    batch = padded_batch([TokenizedSample([], [])] * b, length, pad_id)
    doc_ids = torch.full((b, length), -1, dtype=torch.long)
    positions = torch.zeros((b, length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, sample in enumerate(row):
            n = len(sample)
            lab, msk = _shifted(sample, pad_id)
            span = slice(start, start + n)
            batch["tokens"][r, span] = torch.tensor(sample.tokens)
            batch["labels"][r, span] = torch.tensor(lab)
            batch["loss_mask"][r, span] = torch.tensor(msk, dtype=torch.float)
            doc_ids[r, span] = d
            positions[r, span] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(length - start)  # padding: its own block, masked out
    batch["position_ids"] = positions
    batch["attention_mask"] = block_causal_mask(doc_ids)
    return batch


def split_global_batch(
    lengths: Sequence[int], micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """This DP rank's micro-batches, as positions into the global batch.

    Positions are sorted by length (longest first) and cut into micro-batches, which are dealt
    to the DP ranks in turn: similar lengths share a micro-batch (little padding) and every
    rank gets the same number of micro-batches of a similar mix. The loss is normalised over
    the whole global batch, so the grouping does not change what is optimised.
    """
    n = len(lengths)
    if n % (dp_size * micro_batch_size):
        raise ValueError(f"global batch of {n} is not divisible by micro_batch_size "
                         f"{micro_batch_size} x data-parallel size {dp_size}")
    order = sorted(range(n), key=lambda i: -lengths[i])
    micro = [order[i : i + micro_batch_size] for i in range(0, n, micro_batch_size)]
    return micro[dp_rank::dp_size]


def _packed_micro_batches(
    chosen: Sequence[TokenizedSample], micro_batch_size: int, dp_rank: int, dp_size: int,
    pad_id: int, seq_len: int, pad_multiple: int, uniform_length: bool,
) -> list[dict[str, torch.Tensor]]:
    """Pack the global batch into rows, deal the rows to DP ranks, cut them into micro-batches.

    Under pipeline parallelism (`uniform_length`) every rank needs the same number of equally
    shaped micro-batches, so empty rows fill the gaps; otherwise the last micro-batch of a rank
    may be smaller and only a rank left without rows gets one empty row (no tokens, no loss).
    """
    rows = [[chosen[i] for i in row] for row in pack_rows([len(s) for s in chosen], seq_len)]
    if uniform_length:
        per_rank = round_up(max(1, -(-len(rows) // dp_size)), micro_batch_size)
        rows += [[]] * (per_rank * dp_size - len(rows))
        lengths = [sum(len(s) for s in row) for row in rows]
        longest = round_up(max(lengths), pad_multiple)
        groups = [[rows[i] for i in mb]
                  for mb in split_global_batch(lengths, micro_batch_size, dp_rank, dp_size)]
        return [packed_batch(g, longest, pad_id) for g in groups]
    rows.sort(key=lambda row: -sum(len(s) for s in row))
    mine = rows[dp_rank::dp_size] or [[]]
    groups = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return [packed_batch(g, round_up(max(1, max(sum(len(s) for s in row) for row in g)), pad_multiple), pad_id)
            for g in groups]


def sft_micro_batches(
    samples: Sequence[TokenizedSample],
    indices: Sequence[int],
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    pad_id: int,
    seq_len: int,
    packing: bool = False,
    pad_multiple: int = 8,
    uniform_length: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of one global batch (sample `indices`).

    Lengths are rounded up to `pad_multiple`. With `uniform_length` (needed under pipeline
    parallelism, whose stages exchange fixed-shape activations) every micro-batch of the step
    has the global batch's longest length; otherwise each is only as long as its own longest row.
    """
    chosen = [samples[i] for i in indices]
    if packing:
        return _packed_micro_batches(chosen, micro_batch_size, dp_rank, dp_size, pad_id, seq_len,
                                     pad_multiple, uniform_length)
    lengths = [len(s) for s in chosen]
    groups = [[chosen[i] for i in mb]
              for mb in split_global_batch(lengths, micro_batch_size, dp_rank, dp_size)]
    longest = max(lengths)
    return [padded_batch(g, round_up(longest if uniform_length else max(len(s) for s in g),
                                     pad_multiple), pad_id)
            for g in groups]
