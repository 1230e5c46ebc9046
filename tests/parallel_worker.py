"""Worker for tests/integration/test_parallel_equivalence.py (run by torchrun or plainly).

ref:      1 process, TP=PP=DP=1: save the initial weights, the step-0 gradient and a 5-step loss
          curve.
layouts:  2 processes: for each layout (TP=2, TP=2+SP, PP=2, DP=2 with the distributed
          optimizer) load the same initial weights, save the step-0 gradient (as a distributed
          checkpoint, so any layout's gradient can be read back at TP=1) and the 5-step curve.
compare:  1 process: read every layout's gradient at TP=1 and compare it with the reference.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.megatron.checkpoint import load_model, save_model, unwrap
from megatron_selfreward.megatron.model import build_model
from megatron_selfreward.megatron.parallel import destroy_distributed, init_distributed
from megatron_selfreward.megatron.training import (
    build_train_state,
    causal_batch,
    forward_backward,
    train_step,
)

LAYOUTS = {
    "ref": [],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2": ["parallel.use_distributed_optimizer=true"],
}
BASE = [
    "model.num_layers=4", "sft.global_batch_size=4", "sft.micro_batch_size=1",
    "sft.lr=1e-3", "sft.min_lr=1e-4", "sft.warmup_fraction=0", "model.tie_embeddings=false",
]
STEPS = 5
SEQ = 32


def global_batches(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (4, SEQ + 1), generator=gen) for _ in range(STEPS)]


def my_micro_batches(tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    from megatron.core import parallel_state as ps

    mine = tokens.chunk(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
    return [causal_batch(mine[i : i + 1]) for i in range(mine.shape[0])]


def save_grads(state, directory: Path) -> None:
    """Save the reduced gradient in the weights' place: a checkpoint readable at any layout."""
    model = unwrap(state.model[0])
    originals = {}
    for param in model.parameters():
        originals[param] = param.data
        param.data = param.main_grad.view_as(param).to(param.dtype)
    try:
        save_model(model, directory)
    finally:
        for param, data in originals.items():
            param.data = data


def run_layout(name: str, out: Path) -> None:
    cfg = load_config(None, BASE + LAYOUTS[name])
    env = init_distributed(cfg)
    model = build_model(cfg)
    if name == "ref":
        save_model(model, out / "init")
    else:
        load_model(model, out / "init")
    state = build_train_state(cfg, cfg.sft, total_steps=STEPS, model=model)
    batches = global_batches(cfg.model.vocab_size)
    forward_backward(state, my_micro_batches(batches[0]), force_all_reduce=True)
    save_grads(state, out / f"grads_{name}")
    losses = [train_step(state, my_micro_batches(b))["loss"] for b in batches]
    if env.rank == 0:
        (out / f"losses_{name}.json").write_text(json.dumps(losses))
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def compare(out: Path, names: list[str]) -> None:
    cfg = load_config(None, BASE)
    init_distributed(cfg)
    ref_model = build_model(cfg)
    load_model(ref_model, out / "grads_ref")
    ref = {k: v.clone() for k, v in ref_model.state_dict().items() if torch.is_tensor(v)}
    result = {}
    for name in names:
        model = build_model(cfg)
        load_model(model, out / f"grads_{name}")
        diffs = {}
        for key, value in model.state_dict().items():
            if torch.is_tensor(value) and key in ref:
                denom = ref[key].norm().item() or 1.0
                diffs[key] = (value - ref[key]).norm().item() / denom
        result[name] = diffs
    (out / "grad_diffs.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ref", "layouts", "compare"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layouts", default="tp2,tp2_sp,pp2,dp2")
    args = parser.parse_args()
    names = args.layouts.split(",")
    if args.mode == "ref":
        run_layout("ref", args.out)
    elif args.mode == "layouts":
        for name in names:
            run_layout(name, args.out)
    else:
        compare(args.out, names)
    destroy_distributed()


if __name__ == "__main__":
    main()
