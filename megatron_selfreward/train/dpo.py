"""DPO (M_t -> M_{t+1} in the paper): preference pairs, a frozen reference, beta = 0.1.

The reference model is the initial policy, so its log-probabilities are computed once, before
the first step, by a forward-only pass of the same model (in eval mode: no dropout) and kept as
a small [pairs, 2] table; micro-batches carry their rows. No second model is held in memory.
The table is also written to `out_dir/reference_logps.safetensors` so that a resumed run (whose
weights have moved) uses the same reference.

Normalisation: each micro-batch's loss function returns (sum of its pair losses, its pair count,
report); with `calculate_per_token_loss` megatron divides the gradient by the pair count summed
over micro-batches and DP ranks, so the objective is the mean pair loss of the global batch (as
TRL's) under any TP/PP/DP layout and micro-batch split. Under PP the loss runs on the last stage.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from megatron_selfreward.config import Config
from megatron_selfreward.data.dpo_batches import TokenizedPair, dpo_micro_batches, pair_batch, prepare_dpo
from megatron_selfreward.data.sft_batches import round_up
from megatron_selfreward.losses.dpo import (
    STAT_NAMES,
    PairLoss,
    get_loss,
    pair_stats,
    sequence_logps,
    summarize,
)
from megatron_selfreward.megatron.training import collective_device, next_batch
from megatron_selfreward.records import PreferencePair
from megatron_selfreward.train import loop

REFERENCE_FILE = "reference_logps.safetensors"


def _policy_nll(batch: dict[str, torch.Tensor], model: Any) -> torch.Tensor:
    """Per-token negative log-likelihood [2m, s], computed at the response tokens only (zero elsewhere)."""
    return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                 attention_mask=None, labels=batch["labels"], loss_mask=batch["loss_mask"])


def dpo_loss_func(batch: dict[str, torch.Tensor], loss_fn: PairLoss, beta: float,
                  per_token_nll: torch.Tensor):
    """Megatron's 3-tuple: (sum of pair losses, number of pairs, summed metrics)."""
    logps = sequence_logps(per_token_nll, batch["loss_mask"])
    m = logps.shape[0] // 2
    chosen, rejected = logps[:m], logps[m:]
    ref_chosen, ref_rejected = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
    losses = loss_fn(chosen, rejected, ref_chosen, ref_rejected, beta)
    stats = pair_stats(losses, chosen, rejected, ref_chosen, ref_rejected, beta)
    return losses.sum(), torch.tensor(m, dtype=torch.int), {"dpo": stats}


def dpo_forward_step(loss_fn: PairLoss, beta: float, data_iterator: Iterator, model: Any):
    batch = next_batch(data_iterator, model)
    return _policy_nll(batch, model), partial(dpo_loss_func, batch, loss_fn, beta)


def _logps_loss_func(batch: dict[str, torch.Tensor], per_token_nll: torch.Tensor):
    logps = sequence_logps(per_token_nll, batch["loss_mask"]).detach()
    m = logps.shape[0] // 2
    rows = torch.stack([batch["pair_index"].double(), logps[:m].double(), logps[m:].double()], dim=1)
    return logps.sum() * 0, torch.tensor(0, dtype=torch.int), {"logps": rows}


def _logps_forward_step(data_iterator: Iterator, model: Any):
    batch = next_batch(data_iterator, model)
    return _policy_nll(batch, model), partial(_logps_loss_func, batch)


def _reference_chunks(num_pairs: int, cfg: Config) -> list[list[int]]:
    """Pair indices in order, one global batch per chunk, padded (-1) to divide over DP x micro."""
    opt = cfg.dpo
    _, dp_size = loop.data_parallel()
    unit = dp_size * opt.micro_batch_size
    order = list(range(num_pairs))
    chunks = [order[i : i + opt.global_batch_size] for i in range(0, num_pairs, opt.global_batch_size)]
    return [c + [-1] * (round_up(len(c), unit) - len(c)) for c in chunks]


def reference_batches(cfg: Config, pairs: Sequence[TokenizedPair], indices: list[int],
                      pad_id: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of one reference chunk (pair index -1: padding)."""
    dp_rank, dp_size = loop.data_parallel()
    mbs = cfg.dpo.micro_batch_size
    longest = max(pairs[i].max_len for i in indices if i >= 0)
    per_rank = len(indices) // dp_size
    mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    batches = []
    for j in range(0, len(mine), mbs):
        part = mine[j : j + mbs]  # pair_index -1 marks padding: computed, never stored
        own = max(pairs[max(i, 0)].max_len for i in part)
        length = round_up(longest if loop.uniform_lengths(cfg) else own, loop.pad_multiple(cfg))
        batches.append(pair_batch([pairs[max(i, 0)] for i in part], part, length, pad_id))
    return batches


def compute_reference_logps(cfg: Config, model: list[Any], pairs: Sequence[TokenizedPair],
                            pad_id: int) -> torch.Tensor:
    """[pairs, 2] (chosen, rejected) summed response log-probs under the current weights."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_selfreward.megatron.training import forward_only

    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for chunk in model:
        chunk.eval()
    for indices in _reference_chunks(len(pairs), cfg):
        batches = reference_batches(cfg, pairs, indices, pad_id)
        for report in forward_only(model, batches, _logps_forward_step):
            for idx, chosen, rejected in report["logps"].tolist():
                if idx >= 0:
                    table[int(idx)] = torch.tensor([chosen, rejected], dtype=torch.float64)
    for chunk in model:
        chunk.train()
    table = table.to(collective_device(ps.get_data_parallel_group()))
    if ps.get_data_parallel_world_size() > 1:  # each pair was computed on one DP rank, others hold 0
        dist.all_reduce(table, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(table, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    # Host memory: it is saved with safetensors and sliced into micro-batches like other data.
    return table.float().cpu()


def reference_logps(cfg: Config, state: Any, pairs: Sequence[TokenizedPair], pad_id: int,
                    out_dir: Path, resuming: bool) -> torch.Tensor:
    """The reference table: computed now (and saved), or read back when resuming a run."""
    from safetensors.torch import load_file, save_file

    path = out_dir / REFERENCE_FILE
    if resuming:
        table = load_file(str(path))["ref_logps"]
        if table.shape[0] != len(pairs):
            raise ValueError(f"{path} holds {table.shape[0]} pairs, the data has {len(pairs)}")
        return table
    table = compute_reference_logps(cfg, state.model, pairs, pad_id)
    if loop.rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"ref_logps": table.contiguous()}, str(tmp))
        tmp.replace(path)
    return table


def dpo_task(cfg: Config, pairs: Sequence[TokenizedPair], ref: torch.Tensor, pad_id: int) -> loop.Task:
    opt = cfg.dpo
    dp_rank, dp_size = loop.data_parallel()

    def micro_batches(indices: list[int]) -> loop.MicroBatches:
        return dpo_micro_batches(pairs, indices, micro_batch_size=opt.micro_batch_size,
                                 dp_rank=dp_rank, dp_size=dp_size, pad_id=pad_id,
                                 ref_logps=ref, pad_multiple=loop.pad_multiple(cfg),
                                 uniform_length=loop.uniform_lengths(cfg))

    def batch_tokens(indices: list[int]) -> int:
        return sum(2 * len(pairs[i].prompt) + len(pairs[i].chosen) + len(pairs[i].rejected)
                   for i in indices)

    return loop.Task(
        name="dpo", opt=opt, num_samples=len(pairs),
        forward_step=partial(dpo_forward_step, get_loss(opt.loss_type), opt.beta),
        micro_batches=micro_batches, batch_tokens=batch_tokens, report_key="dpo",
        report_width=len(STAT_NAMES), summarize=summarize)


def prepare_dpo_data(cfg: Config, pairs: Sequence[PreferencePair],
                     init_dir: str | Path | None) -> loop.PreparedData:
    """`pairs` tokenised for `run_dpo(..., data=)`: a caller that must look at the length stats
    first (the train_dpo stage refuses zero usable pairs) tokenises them once, not twice."""
    return loop.prepare_data(cfg, "dpo", pairs, prepare_dpo, init_dir)


def run_dpo(
    cfg: Config,
    pairs: Sequence[PreferencePair],
    init_dir: str | Path | None,
    out_dir: str | Path,
    *,
    resume: bool = True,
    stop_after_steps: int | None = None,
    source: str | None = None,
    data: loop.PreparedData | None = None,
) -> dict[str, Any]:
    """DPO from the model in `init_dir` (policy init = reference); write `out_dir`.

    Works inside an already initialised world (its TP/PP must match the config) or creates one
    from the launcher's environment. Returns a summary (steps, losses, metrics, data counts).
    `source` (the data's file) is named when no example is left to train on. `data`: `pairs`
    already tokenised by `prepare_dpo_data` (every rank must pass the same); None tokenises here.
    """
    from megatron_selfreward.megatron.checkpoint import latest_checkpoint

    if data is not None and data.stats.kept + data.stats.dropped != len(pairs):
        raise ValueError(f"prepared DPO data holds {data.stats.kept + data.stats.dropped} pairs, "
                         f"the pairs given number {len(pairs)}")

    def make_task(state: Any, tpairs: list[TokenizedPair], tokenizer: Any, out: Path, resume: bool):
        resuming = resume and latest_checkpoint(out / "checkpoints") is not None
        started = time.perf_counter()
        ref = reference_logps(cfg, state, tpairs, tokenizer.eos_token_id, out, resuming)
        reference_time_s = time.perf_counter() - started
        return dpo_task(cfg, tpairs, ref, tokenizer.eos_token_id), {"reference_time_s": reference_time_s}

    return loop.run_stage(cfg, "dpo", pairs, prepare_dpo, make_task, init_dir, out_dir,
                          resume=resume, stop_after_steps=stop_after_steps, source=source, data=data)
