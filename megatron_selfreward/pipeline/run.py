"""`selfreward run`: take the base model through the stages that exist so far, on this machine.

Today: import M0, then one generate -> judge -> pair pass with the model judging its own
responses (paper section 4, steps 2-4), on prompts from the seed data. Training stages (SFT to
M1, DPO to M2) plug in here as they land; the run says which stages it ran.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config, save_resolved
from megatron_selfreward.io import write_jsonl
from megatron_selfreward.records import Prompt
from megatron_selfreward.stages.import_model import run_import_model
from megatron_selfreward.stages.manifest import manifest_path
from megatron_selfreward.stages.respond import (
    run_build_pairs,
    run_judge_responses,
    run_sample_responses,
)


def seed_prompts(cfg: Config) -> list[Prompt]:
    """Prompts for the pass: the seed's eval prompts (Self-Instruct generation is a later stage)."""
    from megatron_selfreward.data.seed import load_builtin_seed, load_seed_dir

    seed = load_builtin_seed() if cfg.data.seed == "builtin" else load_seed_dir(Path(cfg.data.seed))
    return list(seed.eval_prompts)[: cfg.generation.prompts.num_prompts]


def _write_prompts(cfg: Config, path: Path) -> None:
    if not path.is_file():
        write_jsonl(path, seed_prompts(cfg))


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
    from megatron_selfreward.megatron.parallel import single_process_world
    from megatron_selfreward.policy import load_policy

    run_dir = Path(cfg.pipeline.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir)
    started = time.time()
    log(f"[1/4] import_model  -> {run_dir / 'models' / 'M0'}")
    m0 = run_import_model(cfg, run_dir)
    it = run_dir / "iter1"
    prompts, responses = it / "prompts.jsonl", it / "responses.jsonl"
    judgements, pairs_path = it / "judgements.jsonl", it / "pairs.jsonl"
    _write_prompts(cfg, prompts)
    with single_process_world(cfg.pipeline.seed):
        policy = load_policy(cfg, m0)
        log(f"[2/4] sample_responses -> {responses}")
        run_sample_responses(cfg, policy.engine, policy.tokenizer, prompts, manifest_path(m0), responses)
        log(f"[3/4] judge_responses  -> {judgements}")
        run_judge_responses(cfg, policy.engine, policy.tokenizer, prompts, responses,
                            manifest_path(m0), judgements)
    log(f"[4/4] build_pairs      -> {pairs_path}")
    pairs = run_build_pairs(prompts, responses, judgements, pairs_path)
    summary = {
        "run_dir": str(run_dir),
        "stages_run": ["import_model", "sample_responses", "judge_responses", "build_pairs"],
        "pairs": len(pairs),
        "judge": json.loads(manifest_path(judgements).read_text())["counts"],
        "wall_time_s": round(time.time() - started, 1),
    }
    return summary
