"""Worker for tests/slurm/test_multinode.py: the tiny model trained 5 steps in one process (ref)
and by 4 srun tasks on two nodes at TP=2 x DP=2 (layout), from the same initial weights and
batches (tests/parallel_worker.py's). Each task of the layout also writes where it ran and what
rendezvous and groups it got, so the test can check TP stays inside a node and DP crosses them.

    python -m tests.slurm.multinode_worker ref --out DIR
    srun -N2 --ntasks-per-node=2 python -m tests.slurm.multinode_worker layout --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import warnings
from pathlib import Path

from megatron_selfreward.config import load_config
from megatron_selfreward.megatron.checkpoint import load_model, save_model
from megatron_selfreward.megatron.model import build_model
from megatron_selfreward.megatron.parallel import destroy_distributed, init_distributed
from megatron_selfreward.megatron.training import build_train_state, train_step
from tests.conftest import CONFIGS
from tests.parallel_worker import STEPS, global_batches, my_micro_batches

# parallel_worker's batches: 4 sequences a step, split into 1-sequence micro batches per DP rank.
BASE = ["sft.global_batch_size=4", "sft.micro_batch_size=1", "sft.warmup_fraction=0"]
LAYOUT = ["parallel.tensor_model_parallel_size=2"]


def run(mode: str, out: Path) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    cfg = load_config(CONFIGS / "tiny.yaml", BASE + (LAYOUT if mode == "layout" else []))
    env = init_distributed(cfg)
    model = build_model(cfg)
    if mode == "ref":
        save_model(model, out / "init")
    else:
        load_model(model, out / "init")
    state = build_train_state(cfg, cfg.sft, total_steps=STEPS, model=model)
    losses = [train_step(state, my_micro_batches(b))["loss"] for b in global_batches(cfg.model.vocab_size)]
    if env.rank == 0:
        (out / f"losses_{mode}.json").write_text(json.dumps(losses))
    if mode == "layout":
        where = {"rank": env.rank, "world_size": env.world_size, "launcher": env.launcher,
                 "master_addr": env.master_addr, "master_port": env.master_port,
                 "hostname": socket.gethostname(), "slurm_node": os.environ.get("SLURMD_NODENAME"),
                 "nodelist": os.environ.get("SLURM_JOB_NODELIST"),
                 "tp_ranks": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
                 "dp_ranks": dist.get_process_group_ranks(ps.get_data_parallel_group())}
        (out / f"rank{env.rank}.json").write_text(json.dumps(where))
    destroy_distributed()


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ref", "layout"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run(args.mode, args.out)


if __name__ == "__main__":
    main()
