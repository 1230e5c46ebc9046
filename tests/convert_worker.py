"""Worker for tests/integration/test_convert_parallel.py, run by torchrun with 2 processes.

For each model in --root (`<name>/hf`: a transformers-saved tiny Llama, `<name>/megatron`: its
converted checkpoint, `<name>/reference.safetensors`: tokens and transformers' logits) and each
layout (TP=2, PP=2), build this rank's GPTModel chunk, fill it two ways — `load_model` of the
converted checkpoint (resharded on load) and `load_hf_into_model` straight from safetensors —
run a forward pass (PP: hidden states sent stage to stage by hand; TP: vocab shards gathered),
and write the largest absolute logits difference to `<out>/<name>_<layout>_<path>.json`.
The checkpoint-loaded model is also saved again in its own layout (`<name>/saved_<layout>`),
for the test to convert back to HF from a TP=2 / PP=2 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
}


def forward_logits(model, tokens: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
    """Full logits [b, s, vocab] on the last stage, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model.eval()(tokens, positions, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def run(root: Path, out: Path, name: str, layout: str) -> None:
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.llama_map import load_hf_into_model
    from megatron_selfreward.megatron.checkpoint import load_model, save_model
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import init_distributed

    ckpt = root / name / "megatron"
    cfg = load_config(ckpt / "model_config.yaml", LAYOUTS[layout])
    env = init_distributed(cfg)
    ref = load_file(root / name / "reference.safetensors")
    loaders = {
        "megatron_ckpt": lambda m: load_model(m, ckpt),
        "hf_in_memory": lambda m: load_hf_into_model(m, root / name / "hf", cfg),
    }
    for path, load in loaders.items():
        model = build_model(cfg)
        load(model)
        logits = forward_logits(model, ref["tokens"], cfg.model.hidden_size)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
            diff = (logits[..., : cfg.model.vocab_size] - ref["logits"]).abs().max().item()
            result = {"rank": env.rank, "max_abs_diff": diff, "shape": list(logits.shape)}
            (out / f"{name}_{layout}_{path}.json").write_text(json.dumps(result))
        if path == "megatron_ckpt":
            save_model(model, root / name / f"saved_{layout}")
    ps.destroy_model_parallel()


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="untied,tied")
    args = parser.parse_args()
    from megatron_selfreward.megatron.parallel import destroy_distributed

    for layout in LAYOUTS:
        for name in args.models.split(","):
            run(args.root, args.out, name, layout)
    destroy_distributed()


if __name__ == "__main__":
    main()
