"""`selfreward run` and `selfreward stage`: the self-rewarding loop on this machine.

`run` plans the whole schedule from the config (`pipeline/schedule.py`) and hands it to the local
executor (`pipeline/local.py`): seed -> M0 -> EFT -> SFT (M1) -> for each iteration prompts ->
responses -> judgements -> pairs -> DPO (M_{t+1}) -> evaluation; finished stages are skipped.
`run_one` runs a single stage of the same plan by name, as a Slurm job would; `import_base_model`
the plan's `import_model` (for `selfreward train` without --init).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config, save_resolved
from megatron_selfreward.pipeline.local import StageContext, run_local, run_stage, stage_done
from megatron_selfreward.pipeline.schedule import find_stage, iter_dir, plan
from megatron_selfreward.stages.manifest import manifest_path
from megatron_selfreward.threads import configure as configure_threads


def _counts(path: Path) -> dict[str, Any]:
    manifest = manifest_path(path)
    return json.loads(manifest.read_text())["counts"] if manifest.is_file() else {}


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
    """Every stage of the plan, in order; a summary of what ran and of the last iteration."""
    threads, why = configure_threads(cfg.executor.cpu_threads)
    log(f"threads: {threads} per process ({why})")
    summary = run_local(cfg, plan(cfg), log)
    last = iter_dir(Path(cfg.pipeline.run_dir), cfg.pipeline.iterations)
    judge = _counts(last / "judgements.jsonl")
    summary["judge"] = {"responses": judge.get("responses", 0), "judge_samples": judge.get("judge_samples", 0),
                        "parse_failures": judge.get("parse_failures", {}), **judge}
    summary["pairs"] = _counts(last / "pairs.jsonl").get("pairs", 0)
    # Degenerate outputs, as the report (the plan's last stage) found them.
    summary["warnings"] = _counts(Path(cfg.pipeline.run_dir) / "report" / "report.md").get("warnings", [])
    return summary


def run_one(cfg: Config, name: str, iteration: int, log: Any = print, array: bool = False,
            gather_only: bool = False) -> bool:
    """Run the stage `name` of iteration `iteration` from the plan; False if it was already done.

    Under a launcher (torchrun, srun, mpirun) every process calls this: a training stage runs
    in one world (rank 0 prepares its output directory first), a sharded generation stage splits
    its shards over the processes (`array`: this is one task of a Slurm job array;
    `gather_only`: assemble what the array wrote), and any other stage runs on rank 0 alone.
    """
    from megatron_selfreward.megatron.parallel import read_dist_env, single_process_world
    from megatron_selfreward.pipeline.registry import SHARDED_STAGES

    configure_threads(cfg.executor.cpu_threads)
    stages = plan(cfg)
    spec = find_stage(stages, name, iteration)
    run_dir = Path(cfg.pipeline.run_dir)
    env = read_dist_env()
    if env.rank == 0 and not (run_dir / "config.yaml").is_file():
        save_resolved(cfg, run_dir)
    if stage_done(spec):
        log(f"{spec.label} (done)")
        return False
    unwritten = _unwritten_inputs(stages, spec, run_dir)
    if unwritten:
        them = "that stage" if len(unwritten) == 1 else "those stages"
        raise FileNotFoundError(f"stage {spec.label} of {run_dir} needs {', '.join(unwritten)}: "
                                f"run {them} first (or `selfreward run`, which runs every stage in order)")
    if env.rank == 0:
        log(f"{spec.label} -> {spec.output}")
    ctx = StageContext(cfg, log, array=array, gather_only=gather_only)
    if spec.name in SHARDED_STAGES:
        run_stage(cfg, spec, ctx)  # forms its worker group (and world) itself
    elif env.world_size > 1 and spec.distributed:
        _run_distributed(cfg, spec, ctx)
    elif env.world_size > 1 and env.rank > 0:
        return False  # a one-process stage started by a launcher: rank 0 runs it
    else:
        with single_process_world(cfg.pipeline.seed):
            run_stage(cfg, spec, ctx)
    ctx.models.release()
    return True


def import_base_model(cfg: Config, log: Any = print) -> Path:
    """The plan's M0 directory, imported unless done. Every process that calls it imports (as
    `selfreward train` under a launcher expects M0 in each); a random initialisation builds its
    model in a 1-process world opened here."""
    from megatron_selfreward.megatron.parallel import single_process_world

    spec = find_stage(plan(cfg), "import_model", 0)
    ctx = StageContext(cfg, log)
    if cfg.model.source == "random":
        with single_process_world(cfg.pipeline.seed):
            run_stage(cfg, spec, ctx)
    else:
        run_stage(cfg, spec, ctx)  # links or converts files: no model, no world
    return spec.output


def _unwritten_inputs(stages: list[Any], spec: Any, run_dir: Path) -> list[str]:
    """The inputs of `spec` that an earlier stage of the plan writes but has not yet, each named
    with that stage. A missing input no stage writes (a user's seed directory) is left to the
    stage, whose own check says what the input should hold."""
    writers = {path: s for s in stages for path in s.outputs.values()}
    missing = []
    for path in spec.inputs.values():
        writer = writers.get(path)
        if writer is None or path.exists():
            continue
        shown = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
        stage = writer.name + (f" --iteration {writer.iteration}" if writer.iteration else "")
        missing.append(f"{shown} (written by `selfreward stage {stage}`)")
    return missing


def _run_distributed(cfg: Config, spec: Any, ctx: StageContext) -> None:
    """A training stage in the launcher's world; rank 0 readies the output directory first."""
    import torch.distributed as dist

    from megatron_selfreward.pipeline.schedule import spec_fingerprint
    from megatron_selfreward.stages.finetune import prepare_out_dir
    from megatron_selfreward.train.loop import training_world

    with training_world(cfg):
        if dist.get_rank() == 0:
            prepare_out_dir(spec.output, spec_fingerprint(spec))
        dist.barrier()
        run_stage(cfg, spec, ctx)
