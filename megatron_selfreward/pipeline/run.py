"""`selfreward run` and `selfreward stage`: the self-rewarding loop on this machine.

`run` plans the whole schedule from the config (`pipeline/plan.py`) and hands it to the local
executor (`pipeline/local.py`): seed -> M0 -> EFT -> SFT (M1) -> for each iteration prompts ->
responses -> judgements -> pairs -> DPO (M_{t+1}) -> evaluation; finished stages are skipped.
`run_one` runs a single stage of the same plan by name, as a Slurm job would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config, save_resolved
from megatron_selfreward.pipeline.local import StageContext, run_local, run_stage, stage_done
from megatron_selfreward.pipeline.plan import find_stage, iter_dir, plan
from megatron_selfreward.stages.manifest import manifest_path


def _counts(path: Path) -> dict[str, Any]:
    manifest = manifest_path(path)
    return json.loads(manifest.read_text())["counts"] if manifest.is_file() else {}


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
    """Every stage of the plan, in order; a summary of what ran and of the last iteration."""
    summary = run_local(cfg, plan(cfg), log)
    last = iter_dir(Path(cfg.pipeline.run_dir), cfg.pipeline.iterations)
    judge = _counts(last / "judgements.jsonl")
    summary["judge"] = {"responses": judge.get("responses", 0), "judge_samples": judge.get("judge_samples", 0),
                        "parse_failures": judge.get("parse_failures", {}), **judge}
    summary["pairs"] = _counts(last / "pairs.jsonl").get("pairs", 0)
    return summary


def run_one(cfg: Config, name: str, iteration: int, log: Any = print) -> bool:
    """Run the stage `name` of iteration `iteration` from the plan; False if it was already done."""
    from megatron_selfreward.megatron.parallel import single_process_world

    spec = find_stage(plan(cfg), name, iteration)
    run_dir = Path(cfg.pipeline.run_dir)
    if not (run_dir / "config.yaml").is_file():
        save_resolved(cfg, run_dir)
    if stage_done(spec):
        log(f"{spec.label} (done)")
        return False
    missing = [f"{k}={p}" for k, p in spec.inputs.items() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"stage {spec.label} needs {', '.join(missing)}: run the stages "
                                "before it first (selfreward run does all of them)")
    log(f"{spec.label} -> {spec.output}")
    ctx = StageContext(cfg, log)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_stage(cfg, spec, ctx)  # under torchrun / srun: the training stage starts its own world
        return True
    with single_process_world(cfg.pipeline.seed):
        run_stage(cfg, spec, ctx)
        ctx.release()
    return True
