"""Build the paper's seed from an Open Assistant export into a seed directory.

    python tools/build_oasst_seed.py 2023-04-12_oasst_ready.trees.jsonl.gz seeds/oasst
    selfreward run data.seed=seeds/oasst

The same as `selfreward seed oasst EXPORT OUT_DIR [--overwrite]`, which this runs. Writes
ift.jsonl (English first turns, human rank-0 reply), ranked.jsonl (prompts with >= 2
human-ranked replies, for EFT) and eval_prompts.jsonl (the built-in eval prompts: OASST has no
held-out instruction set; replace the file to use your own), and prints the sizes beside the
paper's (3,200 IFT; EFT 1,630 train / 541 eval). `selfreward run data.oasst_export=EXPORT` builds
the same seed inside a run instead. A known error prints one line `error: ...` and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_selfreward.tool_entry import run_tool

    return run_tool(argv, ["seed", "oasst"], Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main())
