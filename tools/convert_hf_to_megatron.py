"""Convert a Hugging Face Llama directory into a Megatron distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf runs/demo/models/M0/hf --out runs/demo/models/M0/megatron

The checkpoint is written in the TP=1/PP=1 layout and loads at any TP/PP (megatron reshards on
load); beside it: model_config.yaml (the `model:` config section), hf_config.json and
tokenizer/. Memory stays at a few tensors whatever the model size. The work is done by
``megatron_selfreward.convert.hf_megatron.convert_hf_to_megatron``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, type=Path,
                        help="HF directory: config.json + model.safetensors (or shards with an index)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from megatron_selfreward.convert.hf_megatron import convert_hf_to_megatron

    start_s = time.perf_counter()
    try:
        out_dir = convert_hf_to_megatron(args.hf, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir} from {args.hf} in {time.perf_counter() - start_s:.1f} s")
    return 0


# The guard matters: dist_checkpointing may start helper processes that re-import this script.
if __name__ == "__main__":
    sys.exit(main())
