"""Worker for tests/integration/test_mcore_latest.py, run by the Python of a venv with the newest
megatron-core (0.19.x) in front of the project's .venv.

In --root: `hf/` (a tiny transformers Llama), `reference.safetensors` (tokens and transformers'
logits) and `megatron_0161/` (the same model converted under megatron-core 0.16.1). Writes to
--out: `megatron/` and `hf_back/` (HF -> Megatron -> HF under this megatron-core), `from_0161/`
(the 0.16.1 checkpoint converted back to HF here), `saved/` (a model loaded from `megatron/` and
saved with `save_model`) and `result.json` (versions, the gate's answer, logits differences).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch


def logits_diff(cfg, ckpt: Path, ref: dict[str, torch.Tensor], save_to: Path | None = None) -> float:
    from megatron_selfreward.megatron.checkpoint import load_model, save_model
    from megatron_selfreward.megatron.model import build_model

    model = build_model(cfg)
    load_model(model, ckpt)
    tokens = ref["tokens"]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model.eval()(tokens, positions, attention_mask=None)
    if save_to is not None:
        save_model(model, save_to)
    return (logits[..., : cfg.model.vocab_size] - ref["logits"]).abs().max().item()


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import megatron.core
    from safetensors.torch import load_file

    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.hf_megatron import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_selfreward.megatron.compat import require_megatron_core
    from megatron_selfreward.megatron.parallel import single_process_world

    gate = require_megatron_core()
    ref = load_file(args.root / "reference.safetensors")
    with single_process_world():  # the converters' world, then the models'
        ckpt = convert_hf_to_megatron(args.root / "hf", args.out / "megatron")
        convert_megatron_to_hf(ckpt, args.out / "hf_back")
        convert_megatron_to_hf(args.root / "megatron_0161", args.out / "from_0161")
        cfg = load_config(ckpt / "model_config.yaml")
        diffs = {"converted": logits_diff(cfg, ckpt, ref, save_to=args.out / "saved"),
                 "converted_by_0161": logits_diff(cfg, args.root / "megatron_0161", ref)}
        diffs["saved"] = logits_diff(cfg, args.out / "saved", ref)
    result = {"megatron_core": megatron.core.__version__, "megatron_core_file": megatron.core.__file__,
              "gate": gate, "max_abs_diff": diffs}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
