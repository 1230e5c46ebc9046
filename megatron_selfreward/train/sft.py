"""Supervised fine-tuning (M0 -> M1 in the paper): cross-entropy on the assistant tokens only.

The loss of a global batch is the sum of target-token losses divided by the global count of
target tokens (megatron's `calculate_per_token_loss`), so every TP/PP/DP layout and any split
into micro-batches computes the same gradient.
"""

from __future__ import annotations

from pathlib import Path
from functools import partial
from typing import Any, Iterator, Sequence

import torch

from megatron_selfreward.config import Config
from megatron_selfreward.data.sft_batches import TokenizedSample, prepare_sft, sft_micro_batches
from megatron_selfreward.records import SFTExample
from megatron_selfreward.train import loop


def _summarize(sums: torch.Tensor) -> dict[str, float]:
    return {"loss": float(sums[0] / sums[1].clamp(min=1)), "target_tokens": float(sums[1])}


def sft_forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any):
    """Per-token cross entropy on the target tokens; the loss mask also tells the model where the
    output layer is needed at all (see `megatron.model.target_token_nll`)."""
    from megatron_selfreward.megatron.training import token_loss_sum, next_batch

    batch = next_batch(data_iterator, model)
    per_token_loss = model(
        input_ids=batch["tokens"], position_ids=batch["position_ids"],
        # None = megatron's causal mask; packed batches bring a block-diagonal one.
        attention_mask=batch.get("attention_mask"), labels=batch["labels"],
        loss_mask=batch["loss_mask"])
    return per_token_loss, partial(token_loss_sum, batch["loss_mask"])


def sft_task(cfg: Config, samples: Sequence[TokenizedSample], pad_id: int) -> loop.Task:
    opt = cfg.sft
    dp_rank, dp_size = loop.data_parallel()

    def micro_batches(indices: list[int]) -> loop.MicroBatches:
        return sft_micro_batches(
            samples, indices, micro_batch_size=opt.micro_batch_size, dp_rank=dp_rank,
            dp_size=dp_size, pad_id=pad_id, seq_len=opt.seq_len, packing=opt.packing,
            pad_multiple=loop.pad_multiple(cfg), uniform_length=loop.uniform_lengths(cfg))

    return loop.Task(
        name="sft", opt=opt, num_samples=len(samples), forward_step=sft_forward_step,
        micro_batches=micro_batches, batch_tokens=lambda idx: sum(len(samples[i]) for i in idx),
        report_key="lm_loss", report_width=2, summarize=_summarize)


def run_sft(
    cfg: Config,
    examples: Sequence[SFTExample],
    init_dir: str | Path | None,
    out_dir: str | Path,
    *,
    resume: bool = True,
    stop_after_steps: int | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Fine-tune the model in `init_dir` (None: random init) on `examples`; write `out_dir`.

    Works inside an already initialised world (its TP/PP must match the config) or creates one
    from the launcher's environment. Returns a summary (steps, losses, throughput, data counts).
    `source` (the data's file) is named when no example is left to train on.
    """
    def make_task(state: Any, samples: list[TokenizedSample], tokenizer: Any, out: Path, resume: bool):
        return sft_task(cfg, samples, tokenizer.eos_token_id), {}

    return loop.run_stage(cfg, "sft", examples, prepare_sft, make_task, init_dir, out_dir,
                          resume=resume, stop_after_steps=stop_after_steps, source=source)
