"""`selfreward profile STAGE --iteration T`: one stage of the plan under torch.profiler.

Writes, into `--out` (default `<run_dir>/profile/<stage>_iter<T>/`):

    trace.json      Chrome trace of the whole stage (chrome://tracing, ui.perfetto.dev); CPU ops
                    with input shapes, plus CUDA kernels when CUDA is present
    top_ops.txt     the profiler's table of the top ops by self time (also printed)
    profile.json    stage, wall time, peak RSS / CUDA memory, the top ops as numbers

Where the stage's outputs go: by default into a scratch run directory, `<out>/run/`, that links
every file of the real run except the stage's own outputs (and their manifests and shards), so
the stage reads the real inputs, runs even when the real run has already finished it, and never
touches the real run; the scratch copy is deleted afterwards unless `--keep-outputs`.
`--in-place` runs the stage into the real run directory instead (its outputs and manifest are
then real, as `selfreward stage` would write them); a stage already done there is refused.

The whole stage is profiled (stages have no common step to bound a schedule by): choose a small
config through overrides (`sft.max_steps=5`, fewer prompts) to keep the trace small. A training
stage runs in this process even when `executor.nproc_per_node > 1` (the profiler cannot follow a
torchrun child); under torchrun itself each rank writes `trace_rank<r>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_selfreward.config import Config, save_resolved
from megatron_selfreward.perf.memory import PeakMemory

__all__ = ["add_profile_parser", "mirror_run_dir", "profile_stage"]

TOP_OPS = 25


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def mirror_run_dir(run_dir: Path, scratch: Path, outputs: list[Path], keep_out: Path | None = None) -> Path:
    """A scratch run directory: links to everything in `run_dir` except `outputs` (with their
    manifests and `.shards` dirs: every sibling sharing the output's stem) and `config.yaml`
    (the caller writes its own); directories holding an output are real directories."""
    run_dir, scratch = run_dir.resolve(), scratch.resolve()
    outs = [Path(o).resolve() for o in outputs]
    keep = keep_out.resolve() if keep_out else None

    def holds_output(directory: Path) -> bool:
        return any(directory in o.parents for o in outs)

    def walk(src: Path, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        own = {_stem(o) for o in outs if o.parent == src}
        for entry in sorted(src.iterdir()):
            if src == run_dir and entry.name == "config.yaml":
                continue
            if _stem(entry) in own:
                continue  # an output of the stage, its manifest or its shards: the stage writes them
            if entry.is_dir() and holds_output(entry):
                walk(entry, dst / entry.name)
            elif keep is not None and (entry == keep or entry in keep.parents):
                continue  # the profile's own output directory
            else:
                (dst / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())

    walk(run_dir, scratch)
    return scratch


def _with(cfg: Config, **pipeline_or_executor: Any) -> Config:
    pipeline = dataclasses.replace(cfg.pipeline, **{k: v for k, v in pipeline_or_executor.items()
                                                    if k == "run_dir"})
    executor = dataclasses.replace(cfg.executor, **{k: v for k, v in pipeline_or_executor.items()
                                                    if k == "nproc_per_node"})
    return dataclasses.replace(cfg, pipeline=pipeline, executor=executor)


def _top_ops(prof: Any, limit: int) -> tuple[str, list[dict[str, Any]], str]:
    cuda = torch.cuda.is_available()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort_by, row_limit=limit)
    key = (lambda e: getattr(e, "self_device_time_total", 0)) if cuda else (lambda e: e.self_cpu_time_total)
    rows = []
    for e in sorted(averages, key=key, reverse=True)[:limit]:
        row = {"name": e.key, "calls": e.count, "self_cpu_time_s": e.self_cpu_time_total / 1e6,
               "cpu_time_total_s": e.cpu_time_total / 1e6}
        if cuda:
            row["self_cuda_time_s"] = getattr(e, "self_device_time_total", 0) / 1e6
        rows.append(row)
    return table, rows, sort_by


def profile_stage(cfg: Config, name: str, iteration: int, out: Path | None = None, *,
                  in_place: bool = False, keep_outputs: bool = False, top: int = TOP_OPS,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run stage `name` of iteration `iteration` under torch.profiler; returns profile.json's dict."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_selfreward.pipeline.local import stage_done
    from megatron_selfreward.pipeline.run import run_one
    from megatron_selfreward.pipeline.schedule import find_stage, plan

    run_dir = Path(cfg.pipeline.run_dir)
    spec = find_stage(plan(cfg), name, iteration)  # an unknown stage fails before any work
    out = Path(out) if out else run_dir / "profile" / f"{name}_iter{iteration}"
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    suffix = f"_rank{rank}" if world > 1 else ""
    out.mkdir(parents=True, exist_ok=True)
    if world == 1 and cfg.executor.nproc_per_node > 1:
        log("profile: executor.nproc_per_node set to 1 (the profiler cannot follow a torchrun child)")
        cfg = _with(cfg, nproc_per_node=1)
    scratch = None
    if in_place:
        if stage_done(spec):
            raise FileExistsError(f"{spec.label} is already done in {run_dir}: profile it in a "
                                  "scratch copy (drop --in-place) or delete its manifest first")
    else:
        scratch = out / "run"
        if rank == 0:
            if scratch.exists():
                shutil.rmtree(scratch)
            mirror_run_dir(run_dir, scratch, list(spec.outputs.values()), keep_out=out)
            cfg = _with(cfg, run_dir=str(scratch))
            save_resolved(cfg, scratch)
        else:
            cfg = _with(cfg, run_dir=str(scratch))
            _wait_for(scratch / "config.yaml")  # rank 0 builds the scratch copy
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof, PeakMemory() as memory:
        ran = run_one(cfg, name, iteration, log)
    wall_s = time.perf_counter() - started
    trace = out / f"trace{suffix}.json"
    prof.export_chrome_trace(str(trace))
    table, rows, sort_by = _top_ops(prof, top)
    (out / f"top_ops{suffix}.txt").write_text(table + "\n", encoding="utf-8")
    summary = {
        "stage": name, "iteration": iteration, "label": spec.label, "ran": ran,
        "outputs": "in place: " + str(run_dir) if in_place else
                   (f"scratch: {scratch}" + ("" if keep_outputs else " (deleted)")),
        "wall_time_s": round(wall_s, 3), "memory": memory.result(), "trace": str(trace),
        "activities": [a.name for a in activities], "sort_by": sort_by, "top_ops": rows,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / f"profile{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if scratch is not None and not keep_outputs and rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    log(table)
    log(f"{spec.label}: {wall_s:.2f} s, peak RSS {memory.peak_rss_bytes / 1024**3:.2f} GiB; "
        f"trace {trace} ({trace.stat().st_size / 1e6:.1f} MB)")
    return summary


def _wait_for(path: Path, timeout_s: float = 300.0) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank 0 did not create {path}")
        time.sleep(0.1)


def add_profile_parser(sub: Any, config_args: Callable[[argparse.ArgumentParser], None],
                       func: Callable[[argparse.Namespace], int]) -> None:
    """Register `selfreward profile` on the CLI's subparsers, running `func`."""
    from megatron_selfreward.pipeline.registry import STAGE_NAMES

    p = sub.add_parser("profile", help="run one stage of the plan under torch.profiler: Chrome trace "
                                       "+ top ops (outputs go to a scratch copy of the run)")
    # One sub-command per stage (as `selfreward stage` has): the overrides after the options stay
    # positional arguments of their own.
    names = p.add_subparsers(dest="name", required=True, metavar="STAGE")
    for name in STAGE_NAMES:
        one = names.add_parser(name, help=f"profile the {name} stage")
        one.add_argument("--iteration", type=int, default=0,
                         help="0 for seed/EFT/SFT stages, t for iteration t; evaluate: the model index")
        config_args(one)
        one.add_argument("--out", help="profile directory (default <run_dir>/profile/<stage>_iter<T>)")
        one.add_argument("--in-place", action="store_true",
                         help="write the stage's outputs into the real run directory (default: a scratch copy)")
        one.add_argument("--keep-outputs", action="store_true", help="keep the scratch copy's outputs")
        one.add_argument("--top", type=int, default=TOP_OPS, help="rows of the top-ops table")
        one.set_defaults(func=func)
