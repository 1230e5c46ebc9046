"""Convert a Megatron distributed checkpoint back into a Hugging Face Llama directory.

    python tools/convert_megatron_to_hf.py --ckpt runs/demo/models/M2 --out runs/demo/models/M2/hf
    python tools/convert_megatron_to_hf.py --ckpt CKPT --out OUT --dtype bfloat16 --model-config run.yaml

The same as `selfreward convert megatron-to-hf CKPT OUT [--dtype D] [--model-config YAML]
[--tokenizer DIR] [--max-shard-gb GB] [--overwrite]`, which this runs (`--ckpt` and `--out` are
its SRC and OUT; its --help lists the options). Reads a checkpoint saved at any TP/PP. The model
architecture comes from the checkpoint's model_config.yaml, or from --model-config (any config
YAML or preset; its `model:` section is used) for checkpoints saved by training. Output:
safetensors (sharded with an index above --max-shard-gb, default 5), config.json, tokenizer files
(from CKPT/tokenizer or --tokenizer). A known error prints one line `error: ...` and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_selfreward.tool_entry import run_tool

    return run_tool(argv, ["convert", "megatron-to-hf"], Path(__file__).name, "--ckpt", "--out")


# The guard matters: dist_checkpointing may start helper processes that re-import this script.
if __name__ == "__main__":
    sys.exit(main())
