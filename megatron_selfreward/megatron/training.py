"""Model + optimizer + schedule on megatron.core, and one optimizer step over micro-batches.

The pieces every trainer (SFT, DPO) shares: wrap the model in megatron's DistributedDataParallel,
build megatron's (distributed) optimizer and LR/WD scheduler, and run one global batch through
`get_forward_backward_func()` (no pipelining or 1F1B, chosen by megatron from the PP size).
Losses are summed per token and normalised by the global token count (megatron's
`calculate_per_token_loss`), so any TP/PP/DP layout computes the same gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch

from megatron_selfreward.config import Config, OptimConfig
from megatron_selfreward.megatron.model import build_model, torch_dtype


@dataclass
class TrainState:
    model: list[Any]  # model chunks wrapped in megatron DDP (one chunk: no virtual PP)
    optimizer: Any
    scheduler: Any
    step: int = 0


def _ddp_wrap(cfg: Config, model: torch.nn.Module) -> Any:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # Grads are normalised by the global token count in finalize_model_grads, not by DP size.
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def _optimizer(cfg: Config, opt: OptimConfig, model: list[Any]) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = torch_dtype(cfg.precision.params_dtype)
    oconf = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(oconf, model)


def prefer_fused_adam(optimizer: Any) -> None:
    """Use torch's fused Adam(W) kernel where megatron fell back to torch.optim (no TE/apex).

    The fused kernel (CPU and CUDA) is the same update in one pass over each tensor, about twice
    as fast as the per-parameter loop on CPU; TE's and apex's fused Adams are left alone.
    """
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def _scheduler(opt: OptimConfig, optimizer: Any, total_steps: int) -> Any:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = int(round(opt.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def build_train_state(cfg: Config, opt: OptimConfig, total_steps: int, model: Any = None) -> TrainState:
    """Wrap (or build) this rank's model chunk and create optimizer and scheduler for it."""
    from megatron.core.distributed import finalize_model_grads

    model = model if model is not None else build_model(cfg)
    tconf = model.config
    tconf.calculate_per_token_loss = True
    tconf.finalize_model_grads_func = finalize_model_grads
    if tconf.bf16 or tconf.fp16:
        from megatron.core.transformer.module import Float16Module

        # As Megatron-LM does: half-precision params, fp32 loss out of the last stage; the
        # optimizer keeps fp32 main params and grads are reduced in fp32 (grad_reduce_in_fp32).
        model = Float16Module(tconf, model)
    chunks = [_ddp_wrap(cfg, model)]
    tconf.no_sync_func = chunks[0].no_sync
    tconf.grad_scale_func = None
    optimizer = _optimizer(cfg, opt, chunks)
    prefer_fused_adam(optimizer)
    scheduler = _scheduler(opt, optimizer, total_steps)
    return TrainState(model=chunks, optimizer=optimizer, scheduler=scheduler)


def causal_batch(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Next-token batch from [b, s+1] token ids: inputs, labels, loss mask, positions."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    mask = torch.ones_like(labels, dtype=torch.float) if loss_mask is None else loss_mask[:, 1:].float()
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    return {"tokens": inputs, "labels": labels, "loss_mask": mask, "position_ids": positions}


def token_loss_sum(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss contract: (sum of token losses, token count, values to log)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm_loss": report}


def model_device(model: Any) -> torch.device:
    """Where this rank's model chunk computes: the device of its parameters (DDP and
    Float16Module wrappers included). Not "is CUDA available": a CPU model on a GPU machine, or
    a rank on its own GPU, each ask their parameters."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def next_batch(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any) -> dict[str, torch.Tensor]:
    """The next micro-batch, on the model's device. The data code builds host tensors; each
    micro-batch moves when it is used (as Megatron-LM's `get_batch` in pretrain_gpt.py does), so
    only one micro-batch at a time occupies device memory."""
    device = model_device(model)
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in next(data_iterator).items()}


def collective_device(group: Any = None) -> torch.device:
    """The device a collective on `group` takes its tensors from: NCCL moves CUDA tensors only
    (on this rank's current device), gloo and MPI host tensors; no process group: the host."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend(group) != dist.Backend.NCCL:
        return torch.device("cpu")
    current = torch.cuda.current_device()
    # An index on CUDA builds; the CPU stand-ins (cpu_compat, fake-CUDA tests) return a device.
    return current if isinstance(current, torch.device) else torch.device("cuda", current)


def lm_forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any):
    """Causal-LM forward step: per-token loss from megatron's vocab-parallel cross entropy."""
    batch = next_batch(data_iterator, model)
    per_token_loss = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        # None = megatron's causal mask; packed batches bring a block-diagonal one.
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return per_token_loss, partial(token_loss_sum, batch["loss_mask"])


def reduce_report_sums(reports: list[dict[str, torch.Tensor]], key: str, width: int) -> torch.Tensor:
    """Sum a `width`-vector report over micro-batches and DP ranks, identical on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    # The reports sit on the model's device; the sum lives where the collectives need it.
    total = torch.zeros(width, dtype=torch.float64,
                        device=collective_device(parallel_state.get_data_parallel_group()))
    for report in reports:
        total += report[key].to(total.device, torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    # Only the last pipeline stage computes the loss; share it with the other stages.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(total, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def reduce_loss_reports(reports: list[dict[str, torch.Tensor]], key: str = "lm_loss") -> float:
    """Mean loss per token over a global batch, identical on every rank."""
    total = reduce_report_sums(reports, key, 2)
    return (total[0] / total[1].clamp(min=1)).item()


def forward_only(
    model: list[Any], micro_batches: list[dict[str, torch.Tensor]], forward_step: Callable
) -> list[dict[str, torch.Tensor]]:
    """Forward passes without gradients (e.g. reference log-probs); reports on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0]["tokens"].shape[1],
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=True,
        )


def forward_backward(
    state: TrainState,
    micro_batches: list[dict[str, torch.Tensor]],
    forward_step: Callable = lm_forward_step,
    force_all_reduce: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Zero the grads, run forward+backward over the micro-batches, reduce grads across DP.

    `force_all_reduce` leaves every DP rank with the full reduced gradient even under the
    distributed optimizer (which normally reduce-scatters), for inspecting gradients.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=state.model,
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0]["tokens"].shape[1],
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=False,
        force_all_reduce=force_all_reduce,
    )


def train_step(
    state: TrainState,
    micro_batches: list[dict[str, torch.Tensor]],
    forward_step: Callable = lm_forward_step,
    report_key: str = "lm_loss",
) -> dict[str, float]:
    """One optimizer step over this DP rank's micro-batches (each [micro_batch, seq])."""
    reports = forward_backward(state, micro_batches, forward_step)
    update_ok, grad_norm, _ = state.optimizer.step()
    lr = state.optimizer.param_groups[0]["lr"]
    if update_ok:
        state.scheduler.step(increment=1)
        state.step += 1
    loss = reduce_loss_reports(reports, report_key)
    return {
        "loss": loss,
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "lr": lr,
        "skipped": float(not update_ok),
    }
