"""The training loop SFT and DPO share: steps, logging, checkpoints, exact resume.

A `Task` says what differs between them (how a global batch of sample indices becomes this
rank's micro-batches, the forward step, how the loss reports turn into metrics); everything else
is here. Each step runs megatron's forward-backward schedule (no pipelining or 1F1B, chosen
from the PP size) over the micro-batches, then megatron's (distributed) optimizer with gradient
clipping, then the warmup + decay LR schedule.

Output directory: `megatron/` (the final model, a distributed checkpoint `policy.load_weights_into`
reads), `checkpoints/step_N/` (full training state every `save_interval_steps` and at the end),
`metrics.jsonl` (one line per step, rank 0) and `tensorboard/`. Starting again on the same
directory resumes from the newest complete checkpoint and reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megatron_selfreward.config import Config, OptimConfig
from megatron_selfreward.data.sft_batches import LengthStats
from megatron_selfreward.megatron.parallel import process_rank as rank
from megatron_selfreward.train.sampler import GlobalBatchSampler, total_steps_for

MicroBatches = list[dict[str, torch.Tensor]]


@dataclass
class Task:
    name: str  # "sft" or "dpo": metric prefix
    opt: OptimConfig
    num_samples: int
    forward_step: Callable
    micro_batches: Callable[[list[int]], MicroBatches]  # global batch indices -> this rank's
    batch_tokens: Callable[[list[int]], int]  # real (non-pad) tokens in a global batch
    report_key: str
    report_width: int
    summarize: Callable[[torch.Tensor], dict[str, float]]  # reduced report sums -> metrics


# ---------------------------------------------------------------------------------------------
# The process group


@contextlib.contextmanager
def training_world(cfg: Config) -> Iterator[None]:
    """Use megatron's parallel state if the caller set it up (it must match the config), else
    start one from the launcher's environment (torchrun, srun, or a 1-process world) and end it."""
    from megatron_selfreward.megatron.compat import require_megatron_core

    require_megatron_core()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_selfreward.config import ConfigError
    from megatron_selfreward.megatron import cpu_compat
    from megatron_selfreward.megatron.parallel import init_distributed

    cpu_compat.apply()
    if ps.model_parallel_is_initialized():
        p = cfg.parallel
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (p.tensor_model_parallel_size, p.pipeline_model_parallel_size):
            raise ConfigError(f"config key 'parallel.tensor_model_parallel_size': the running world "
                              f"has TP, PP = {have}, the config asks for "
                              f"{(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)}")
        yield
        return
    created = not dist.is_initialized()
    init_distributed(cfg)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        if created and dist.is_initialized():
            dist.destroy_process_group()


def data_parallel() -> tuple[int, int]:
    """(this rank's data-parallel index, data-parallel size)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def uniform_lengths(cfg: Config) -> bool:
    """Pipeline stages exchange fixed-shape activations: every micro-batch of a step alike."""
    return cfg.parallel.pipeline_model_parallel_size > 1


def pad_multiple(cfg: Config) -> int:
    # Sequence parallelism splits the sequence over TP ranks: lengths must divide evenly.
    return math.lcm(8, cfg.parallel.tensor_model_parallel_size)


# ---------------------------------------------------------------------------------------------
# Logging (rank 0)


class MetricsLog:
    """metrics.jsonl + TensorBoard + a tqdm bar, written by global rank 0 only."""

    def __init__(self, out_dir: Path, name: str, total_steps: int, start_step: int) -> None:
        self.active = rank() == 0
        self.name = name
        self.path = out_dir / "metrics.jsonl"
        self.writer = self.bar = None
        if not self.active:
            return
        self._truncate(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            self.writer = None
        from megatron_selfreward.progress import progress_bar

        self.bar = progress_bar(total_steps, name, initial=start_step, unit="step")

    def _truncate(self, start_step: int) -> None:
        """On resume, forget the lines of steps after the checkpoint (they are redone)."""
        from megatron_selfreward.io import atomic_write_text

        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{self.name}/{key}", value, record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Steps and checkpoints


def _step(state: Any, task: Task, sampler: GlobalBatchSampler) -> dict[str, Any]:
    from megatron_selfreward.megatron.training import forward_backward, reduce_report_sums

    started = time.perf_counter()
    indices = sampler.next_batch()
    reports = forward_backward(state, task.micro_batches(indices), task.forward_step)
    update_ok, grad_norm, _ = state.optimizer.step()
    lr = state.optimizer.param_groups[0]["lr"]
    if update_ok:
        state.scheduler.step(increment=1)
        state.step += 1
    metrics = task.summarize(reduce_report_sums(reports, task.report_key, task.report_width))
    elapsed = time.perf_counter() - started
    tokens = task.batch_tokens(indices)
    return {"step": state.step, **metrics, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "skipped": int(not update_ok), "tokens": tokens, "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed, "epoch": sampler.epoch,
            "consumed_samples": sampler.consumed_samples}


def _save(state: Any, sampler: GlobalBatchSampler, out_dir: Path, total_steps: int) -> Path:
    from megatron_selfreward.megatron.checkpoint import save_train_state

    trainer_state = {"step": state.step, "total_steps": total_steps,
                     "scheduler": state.scheduler.state_dict(), "data": sampler.state_dict()}
    return save_train_state(state.model, state.optimizer, out_dir / "checkpoints" / f"step_{state.step}",
                            trainer_state)


def _resume(state: Any, sampler: GlobalBatchSampler, out_dir: Path, total_steps: int) -> Path | None:
    from megatron_selfreward.megatron.checkpoint import latest_checkpoint, load_train_state

    ckpt = latest_checkpoint(out_dir / "checkpoints")
    if ckpt is None:
        return None
    saved = load_train_state(state.model, state.optimizer, ckpt)
    if saved["total_steps"] != total_steps:
        raise ValueError(f"cannot resume from {ckpt}: it was a {saved['total_steps']}-step run, this "
                         f"one has {total_steps} steps (changed data or config); use a new output dir")
    state.step = int(saved["step"])
    state.scheduler.load_state_dict(saved["scheduler"])
    sampler.load_state_dict(saved["data"])
    return ckpt


def train(
    cfg: Config, task: Task, state: Any, out_dir: Path, *,
    resume: bool = True, stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the optimizer steps of `task` on an already built train `state`.

    `stop_after_steps` ends this process's share after that many steps with a checkpoint, as a
    time-limited job would (the next call on the same `out_dir` resumes).
    """
    from megatron.core import tensor_parallel

    from megatron_selfreward.megatron.checkpoint import save_model

    opt = task.opt
    total = total_steps_for(task.num_samples, opt.global_batch_size, opt.epochs, opt.max_steps)
    sampler = GlobalBatchSampler(task.num_samples, opt.global_batch_size, opt.seed)
    # Dropout masks come from the seeded generators (megatron's tracker for TP regions); a resume
    # restores them from the checkpoint instead.
    tensor_parallel.model_parallel_cuda_manual_seed(opt.seed)
    resumed_from = _resume(state, sampler, out_dir, total) if resume else None
    for chunk in state.model:
        chunk.train()
    log = MetricsLog(out_dir, task.name, total, state.step)
    started, steps_run, last_saved, records = time.perf_counter(), 0, state.step, []
    try:
        while state.step < total and (stop_after_steps is None or steps_run < stop_after_steps):
            record = _step(state, task, sampler)
            records.append(record)
            log.log(record)
            steps_run += 1
            if state.step % opt.save_interval_steps == 0 or state.step == total:
                _save(state, sampler, out_dir, total)
                last_saved = state.step
        if state.step != last_saved:
            _save(state, sampler, out_dir, total)
    finally:
        log.close()
    finished = state.step >= total
    if finished:
        save_model(state.model[0], out_dir / "megatron")
    elapsed = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in records)
    return {"steps": state.step, "total_steps": total, "finished": finished,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "steps_this_run": steps_run, "losses": [r["loss"] for r in records],
            "final": records[-1] if records else None, "train_time_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}


# ---------------------------------------------------------------------------------------------
# Set-up shared by run_sft and run_dpo


@dataclass(frozen=True)
class PreparedData:
    """A data set tokenised for one stage: what `prepare` returned (`items`, `stats`) and the
    tokenizer that made them (its end-of-sequence id pads the batches)."""

    items: list
    stats: LengthStats
    tokenizer: Any


def prepare_data(cfg: Config, section: str, records: Any, prepare: Callable,
                 init_dir: str | Path | None) -> PreparedData:
    """Tokenise `records` for `<section>` (its seq_len) with the init model's tokenizer.

    Deterministic: every rank that prepares the same records holds the same data.
    """
    tokenizer = init_tokenizer(cfg, init_dir)
    items, stats = prepare(records, tokenizer, cfg.model.chat_template, getattr(cfg, section).seq_len)
    return PreparedData(items, stats, tokenizer)


def run_stage(
    cfg: Config, section: str, records: Any, prepare: Callable, make_task: Callable,
    init_dir: str | Path | None, out_dir: str | Path, *, resume: bool, stop_after_steps: int | None,
    source: str | None = None, data: PreparedData | None = None,
) -> dict[str, Any]:
    """The body of run_sft / run_dpo: world, tokenizer, data, train state, train, model dir.

    `prepare(records, tokenizer, template, seq_len) -> (items, LengthStats)`;
    `make_task(state, items, tokenizer, out_dir, resume) -> (Task, extra summary entries)`;
    `source`: where the records came from, named when none of them is left to train on;
    `data`: `records` already prepared (`prepare_data`), so they are not tokenised again.
    """
    from megatron_selfreward.data.sft_batches import check_not_empty
    from megatron_selfreward.megatron.training import build_train_state

    out = Path(out_dir)
    with training_world(cfg):
        opt = getattr(cfg, section)
        if data is None:
            data = prepare_data(cfg, section, records, prepare, init_dir)
        items, stats, tokenizer = data.items, data.stats, data.tokenizer
        if rank() == 0:
            print(stats.describe(section, opt.seq_len), flush=True)
        check_not_empty(stats, section, opt.seq_len, source)
        total = total_steps_for(len(items), opt.global_batch_size, opt.epochs, opt.max_steps)
        state = build_train_state(cfg, opt, total, init_model(cfg, init_dir))
        task, extra = make_task(state, items, tokenizer, out, resume)
        summary = train(cfg, task, state, out, resume=resume, stop_after_steps=stop_after_steps)
        summary["data"] = stats.as_dict()
        summary.update(extra)
        copy_tokenizer(init_dir, out)
        write_summary(out, summary)
    return summary


def init_model(cfg: Config, init_dir: str | Path | None) -> Any:
    """This rank's model chunk with the init weights (`init_dir` a model dir; None = random init)."""
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.policy import load_weights_into

    model = build_model(cfg)
    if init_dir is not None:
        load_weights_into(model, cfg, Path(init_dir))
    return model


def init_tokenizer(cfg: Config, init_dir: str | Path | None) -> Any:
    from megatron_selfreward.policy import load_tokenizer
    from megatron_selfreward.tokenizer import ByteTokenizer

    return load_tokenizer(cfg, Path(init_dir)) if init_dir is not None else ByteTokenizer(cfg.model.vocab_size)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def copy_tokenizer(init_dir: str | Path | None, out_dir: Path) -> None:
    """Make `out_dir` a complete model directory: the init model's tokenizer files in tokenizer/."""
    import shutil

    if init_dir is None or rank() != 0:
        return
    for sub in ("hf", "tokenizer"):
        src = Path(init_dir) / sub
        if (src / "tokenizer_config.json").is_file():
            dst = out_dir / "tokenizer"
            dst.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
            return


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    from megatron_selfreward.io import atomic_write_json

    if rank() == 0:
        atomic_write_json(out_dir / "summary.json", summary)
