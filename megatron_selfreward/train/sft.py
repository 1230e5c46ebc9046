"""Supervised fine-tuning (M0 -> M1 in the paper): cross-entropy on the assistant tokens only.

The loss of a global batch is the sum of target-token losses divided by the global count of
target tokens (megatron's `calculate_per_token_loss`), so every TP/PP/DP layout and any split
into micro-batches computes the same gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_selfreward.config import Config
from megatron_selfreward.data.sft_data import TokenizedSample, prepare_sft, sft_micro_batches
from megatron_selfreward.records import SFTExample
from megatron_selfreward.train import loop


def _summarize(sums: torch.Tensor) -> dict[str, float]:
    return {"loss": float(sums[0] / sums[1].clamp(min=1)), "target_tokens": float(sums[1])}


def sft_task(cfg: Config, samples: Sequence[TokenizedSample], pad_id: int) -> loop.Task:
    from megatron_selfreward.megatron.training import lm_forward_step

    opt = cfg.sft
    dp_rank, dp_size = loop.data_parallel()

    def micro_batches(indices: list[int]) -> loop.MicroBatches:
        return sft_micro_batches(
            samples, indices, micro_batch_size=opt.micro_batch_size, dp_rank=dp_rank,
            dp_size=dp_size, pad_id=pad_id, seq_len=opt.seq_len, packing=opt.packing,
            pad_multiple=loop.pad_multiple(cfg), uniform_length=loop.uniform_lengths(cfg))

    return loop.Task(
        name="sft", opt=opt, num_samples=len(samples), forward_step=lm_forward_step,
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
) -> dict[str, Any]:
    """Fine-tune the model in `init_dir` (None: random init) on `examples`; write `out_dir`.

    Works inside an already initialised world (its TP/PP must match the config) or creates one
    from the launcher's environment. Returns a summary (steps, losses, throughput, data counts).
    """
    out = Path(out_dir)
    with loop.training_world(cfg):
        from megatron_selfreward.megatron.training import build_train_state
        from megatron_selfreward.train.sampler import total_steps_for

        opt = cfg.sft
        tokenizer = loop.init_tokenizer(cfg, init_dir)
        samples, stats = prepare_sft(examples, tokenizer, cfg.model.chat_template, opt.seq_len)
        total = total_steps_for(len(samples), opt.global_batch_size, opt.epochs, opt.max_steps)
        state = build_train_state(cfg, opt, total, loop.init_model(cfg, init_dir))
        task = sft_task(cfg, samples, tokenizer.eos_token_id)
        summary = loop.train(cfg, task, state, out, resume=resume, stop_after_steps=stop_after_steps)
        summary["data"] = stats.as_dict()
        loop.copy_tokenizer(init_dir, out)
        loop.write_summary(out, summary)
    return summary
