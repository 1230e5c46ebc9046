"""DPO data: preference pairs -> token ids -> micro-batches holding chosen and rejected together.

A pair (the pipeline's `pairs.jsonl`, `PreferencePair` records) becomes the prompt rendered as a
user turn plus the generation prompt, and the two responses rendered as assistant turns (text
and end-of-turn marker), each tokenised on its own, exactly as `sft_batches` does. The loss counts
only response tokens.

Over-long pairs: the prompt is kept whole and each response is cut to fit `seq_len`; a pair
whose prompt alone fills `seq_len` is dropped. Both are counted.

A micro-batch of m pairs is 2m rows: the m chosen sequences, then the m rejected ones, so the
loss function sees both halves of every pair. Each pair carries its index into the data set,
which the trainer uses to attach the reference log-probabilities computed once before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_selfreward.data.sft_batches import (
    LengthStats,
    TokenizedSample,
    fit_all,
    padded_batch,
    round_up,
    split_global_batch,
)
from megatron_selfreward.records import PreferencePair
from megatron_selfreward.tokenizer import Tokenizer, render_chat


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def sequences(self) -> tuple[TokenizedSample, TokenizedSample]:
        head = [0] * len(self.prompt)
        return (TokenizedSample(self.prompt + self.chosen, head + [1] * len(self.chosen)),
                TokenizedSample(self.prompt + self.rejected, head + [1] * len(self.rejected)))

    @property
    def max_len(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """The pipeline's pairs.jsonl (one PreferencePair per line; errors name the line)."""
    from megatron_selfreward.io import read_records

    return list(read_records(path, PreferencePair))


def _response_text(prompt_msgs: list[dict[str, str]], prompt_text: str, response: str, template: str) -> str:
    full = render_chat(prompt_msgs + [{"role": "assistant", "content": response}], template, False)
    if not full.startswith(prompt_text):
        raise ValueError(f"chat template {template!r} does not render the prompt as a prefix")
    return full[len(prompt_text):]


def tokenize_pair(pair: PreferencePair, tokenizer: Tokenizer, template: str) -> TokenizedPair:
    msgs = [{"role": "user", "content": pair.prompt}]
    prompt_text = render_chat(msgs, template, add_generation_prompt=True)
    return TokenizedPair(
        prompt=tokenizer.encode(prompt_text),
        chosen=tokenizer.encode(_response_text(msgs, prompt_text, pair.chosen, template)),
        rejected=tokenizer.encode(_response_text(msgs, prompt_text, pair.rejected, template)),
    )


def fit_pair(pair: TokenizedPair, seq_len: int) -> tuple[TokenizedPair | None, bool]:
    """(pair with responses cut to fit `seq_len`, or None if the prompt leaves no room; was it cut)."""
    room = seq_len - len(pair.prompt)
    if room <= 0:
        return None, False
    if max(len(pair.chosen), len(pair.rejected)) <= room:
        return pair, False
    return TokenizedPair(pair.prompt, pair.chosen[:room], pair.rejected[:room]), True


def prepare_dpo(
    pairs: Sequence[PreferencePair], tokenizer: Tokenizer, template: str, seq_len: int
) -> tuple[list[TokenizedPair], LengthStats]:
    return fit_all(pairs, lambda pair: fit_pair(tokenize_pair(pair, tokenizer, template), seq_len))


def pair_batch(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], length: int, pad_id: int,
    ref_logps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """2m rows (chosen first, then rejected), the pairs' data-set indices and reference log-probs."""
    chosen, rejected = zip(*(p.sequences() for p in pairs))
    batch = padded_batch(list(chosen) + list(rejected), length, pad_id)
    batch["pair_index"] = torch.tensor(list(indices), dtype=torch.long)
    if ref_logps is not None:
        batch["ref_logps"] = ref_logps[batch["pair_index"]]  # [m, 2]: chosen, rejected
    return batch


def dpo_micro_batches(
    pairs: Sequence[TokenizedPair],
    indices: Sequence[int],
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    pad_id: int,
    ref_logps: torch.Tensor | None = None,
    pad_multiple: int = 8,
    uniform_length: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of one global batch of pair `indices` (micro_batch_size pairs each).

    Grouped by length as `sft_batches.split_global_batch` does; `uniform_length` as in
    `sft_batches.sft_micro_batches` (required under pipeline parallelism).
    """
    lengths = [pairs[i].max_len for i in indices]
    longest = max(lengths)
    out = []
    for mb in split_global_batch(lengths, micro_batch_size, dp_rank, dp_size):
        chunk = [indices[k] for k in mb]
        length = round_up(longest if uniform_length else max(lengths[k] for k in mb), pad_multiple)
        out.append(pair_batch([pairs[i] for i in chunk], chunk, length, pad_id, ref_logps))
    return out
