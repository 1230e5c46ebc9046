"""Convert a Hugging Face Llama directory into a Megatron distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf runs/demo/models/M0/hf --out runs/demo/models/M0/megatron

The same as `selfreward convert hf-to-megatron HF_DIR OUT_DIR [--dtype D] [--overwrite]`, which
this runs (`--hf` and `--out` are its SRC and OUT; its --help lists the options). The checkpoint
is written in the TP=1/PP=1 layout and loads at any TP/PP (megatron reshards on load); beside it:
model_config.yaml (the `model:` config section), hf_config.json and tokenizer/. Memory stays at
a few tensors whatever the model size. A known error prints one line `error: ...` and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_selfreward.tool_entry import run_tool

    return run_tool(argv, ["convert", "hf-to-megatron"], Path(__file__).name, "--hf", "--out")


# The guard matters: dist_checkpointing may start helper processes that re-import this script.
if __name__ == "__main__":
    sys.exit(main())
