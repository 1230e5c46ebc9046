"""A seed that teaches the random-init tiny model to answer "Score: k" within a few SFT steps.

The built-in seed cannot make a 2-layer random model a judge, so a tiny run ends with zero pairs
(which the bad-input tests want). For the full loop the IFT answers here are "Score: 1".."Score: 5"
(cycled): after SFT the model writes a parseable, sampled score for any prompt, judge prompts
included, so iterations produce real preference pairs and DPO runs on them.
"""

from __future__ import annotations

from pathlib import Path

from megatron_selfreward.data.seed import load_builtin_seed
from megatron_selfreward.io import write_jsonl
from megatron_selfreward.records import SFTExample

# What the tiny preset needs on top to learn the format reliably (about 15 s of SFT). The model
# then writes its own scores, so the paper's judge runs: nothing forced (judge.force_score off).
SCORE_SFT_OVERRIDES = ["sft.max_steps=200", "sft.lr=3e-3", "sft.min_lr=3e-4", "judge.force_score=false"]


def write_score_seed(directory: Path) -> Path:
    seed = load_builtin_seed()
    directory.mkdir(parents=True, exist_ok=True)
    ift = [SFTExample(messages=[next(m for m in ex.messages if m["role"] == "user"),
                                {"role": "assistant", "content": f"Score: {1 + i % 5}"}])
           for i, ex in enumerate(seed.ift)]
    write_jsonl(directory / "ift.jsonl", ift)
    write_jsonl(directory / "ranked.jsonl", seed.ranked)
    write_jsonl(directory / "eval_prompts.jsonl", seed.eval_prompts)
    return directory
