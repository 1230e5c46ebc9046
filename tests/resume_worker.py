"""Worker for tests/integration/test_resume_kill.py: sample_responses then judge_responses on the
tiny preset with small shards, in a run directory given on the command line.

    python tests/resume_worker.py RUN_DIR

A rerun on the same directory continues where a killed one stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROMPTS = 16
OVERRIDES = ["pipeline.shard_size=2", "generation.max_new_tokens=8", "judge.max_new_tokens=8"]


def main(run_dir: Path) -> None:
    from megatron_selfreward.config import load_config
    from megatron_selfreward.data.seed import load_builtin_seed
    from megatron_selfreward.io import write_jsonl
    from megatron_selfreward.megatron.parallel import single_process_world
    from megatron_selfreward.pipeline.params import judge_params, sampling_params
    from megatron_selfreward.pipeline.run import import_base_model
    from megatron_selfreward.policy import load_policy
    from megatron_selfreward.records import Prompt
    from megatron_selfreward.stages.manifest import fingerprint, manifest_path
    from megatron_selfreward.stages.respond import run_judge_responses, run_sample_responses

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"pipeline.run_dir={run_dir}", *OVERRIDES])
    m0 = import_base_model(cfg)
    it = run_dir / "iter1"
    prompts = it / "prompts.jsonl"
    if not prompts.is_file():
        texts = [p.text for p in load_builtin_seed().eval_prompts][:PROMPTS]
        write_jsonl(prompts, [Prompt(prompt_id=f"p{i:03d}", text=t) for i, t in enumerate(texts)])
    with single_process_world(cfg.pipeline.seed):
        policy = load_policy(cfg, m0)
        print("sampling", flush=True)
        fp = fingerprint({"prompts": prompts, "model": manifest_path(m0)}, sampling_params(cfg))
        run_sample_responses(cfg, policy.engine, policy.tokenizer, prompts, fp, it / "responses.jsonl")
        print("judging", flush=True)
        fp = fingerprint({"prompts": prompts, "responses": it / "responses.jsonl", "model": manifest_path(m0)},
                         judge_params(cfg))
        run_judge_responses(cfg, policy.engine, policy.tokenizer, prompts, it / "responses.jsonl",
                            fp, it / "judgements.jsonl")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
