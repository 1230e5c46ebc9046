"""Worker for tests/integration/test_train_parallel.py (run plainly or by torchrun, 2 processes).

ref:      1 process, TP=PP=DP=1: save the initial weights, then 5-step SFT and DPO loss curves.
layouts:  2 processes, one launch: the same curves at TP=2 (+SP), PP=2 and DP=2 (distributed
          optimizer); then, for the plain and the distributed optimizer at DP=2 with dropout, a
          6-step run saving at step 3, and the same run stopped after step 3.
resume:   2 new processes: the stopped runs continue from their step-3 checkpoints.
Curves are written as JSON under --out; the test compares them.
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

from megatron_selfreward.config import load_config
from megatron_selfreward.records import PreferencePair, SFTExample

LAYOUTS = {
    "ref": [],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2": ["parallel.use_distributed_optimizer=true"],
}
BASE = [
    "sft.global_batch_size=4", "sft.micro_batch_size=1", "sft.seq_len=64", "sft.lr=1e-3",
    "sft.max_steps=5", "dpo.global_batch_size=4", "dpo.micro_batch_size=1", "dpo.seq_len=64",
    "dpo.lr=1e-3", "dpo.min_lr=1e-4", "dpo.max_steps=5",
]
RESUME = {
    "plain": ["parallel.use_distributed_optimizer=false"],
    "distopt": ["parallel.use_distributed_optimizer=true"],
}
RESUME_BASE = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1", "sft.max_steps=6",
               "dpo.max_steps=6", "sft.save_interval_steps=3", "dpo.save_interval_steps=3"]
WORDS = "the a cat dog sat ran on under mat log big small red blue".split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def sft_examples() -> list[SFTExample]:
    rng = random.Random(0)
    return [SFTExample([{"role": "user", "content": _text(rng, 1, 6)},
                        {"role": "assistant", "content": _text(rng, 1, 8)}]) for _ in range(12)]


def dpo_pairs() -> list[PreferencePair]:
    rng = random.Random(1)
    return [PreferencePair(prompt_id=f"p{i}", prompt=_text(rng, 1, 4), chosen=_text(rng, 1, 6),
                           rejected=_text(rng, 1, 6), chosen_score=5.0, rejected_score=2.0)
            for i in range(12)]


def run(task: str, overrides: list[str], init: Path, out: Path, stop: int | None = None) -> list[float]:
    from megatron_selfreward.train import run_dpo, run_sft
    from megatron_selfreward.train.loop import read_metrics

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", BASE + overrides)
    if task == "sft":
        run_sft(cfg, sft_examples(), init, out, stop_after_steps=stop)
    else:
        run_dpo(cfg, dpo_pairs(), init, out, stop_after_steps=stop)
    return [m["loss"] for m in read_metrics(out)]


def save_init(out: Path) -> None:
    from megatron_selfreward.megatron.checkpoint import save_model
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", BASE)
    with single_process_world(seed=17):
        save_model(build_model(cfg), out / "init" / "megatron")


def main() -> None:
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ref", "layouts", "resume"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layouts", default="tp2,tp2_sp,pp2,dp2")
    args = parser.parse_args()
    out, init = args.out, args.out / "init"
    curves: dict[str, list[float]] = {}
    if args.mode == "ref":
        save_init(out)
        for task in ("sft", "dpo"):
            curves[f"{task}_ref"] = run(task, [], init, out / f"{task}_ref")
    else:
        # One process group for the whole launch; each run sets up (and ends) megatron's groups.
        dist.init_process_group("gloo")
        if args.mode == "layouts":
            for name in args.layouts.split(","):
                for task in ("sft", "dpo"):
                    curves[f"{task}_{name}"] = run(task, LAYOUTS[name], init, out / f"{task}_{name}")
        for opt, overrides in RESUME.items():
            for task in ("sft", "dpo"):
                key = f"{task}_{opt}"
                if args.mode == "layouts":
                    curves[f"{key}_full"] = run(task, RESUME_BASE + overrides, init, out / f"{key}_full")
                    curves[f"{key}_stopped"] = run(task, RESUME_BASE + overrides, init,
                                                   out / f"{key}_resumed", stop=3)
                else:
                    curves[f"{key}_resumed"] = run(task, RESUME_BASE + overrides, init, out / f"{key}_resumed")
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    (out / f"curves_{args.mode}.json").write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
