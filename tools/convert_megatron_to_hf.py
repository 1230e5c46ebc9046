"""Convert a Megatron distributed checkpoint back into a Hugging Face Llama directory.

    python tools/convert_megatron_to_hf.py --ckpt runs/demo/models/M2 --out runs/demo/models/M2/hf
    python tools/convert_megatron_to_hf.py --ckpt CKPT --out OUT --dtype bfloat16 --model-config run.yaml

Reads a checkpoint saved at any TP/PP. The model architecture comes from the checkpoint's
model_config.yaml, or from --model-config (any config YAML; its `model:` section is used) for
checkpoints saved by training. Output: safetensors (sharded with an index above
--max-shard-gb), config.json, tokenizer files. The work is done by
``megatron_selfreward.convert.hf_megatron.convert_megatron_to_hf``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="Megatron distributed checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="HF directory to create")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="output dtype (default: the checkpoint's)")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="config YAML whose model: section describes the checkpoint")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="directory to copy tokenizer files from (default: CKPT/tokenizer)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.hf_megatron import convert_megatron_to_hf

    start_s = time.perf_counter()
    try:
        model_cfg = load_config(args.model_config).model if args.model_config else None
        out_dir = convert_megatron_to_hf(
            args.ckpt, args.out, dtype=args.dtype, model_cfg=model_cfg, tokenizer_dir=args.tokenizer,
            max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir} from {args.ckpt} in {time.perf_counter() - start_s:.1f} s")
    return 0


# The guard matters: dist_checkpointing may start helper processes that re-import this script.
if __name__ == "__main__":
    sys.exit(main())
