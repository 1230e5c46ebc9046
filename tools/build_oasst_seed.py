"""Build the paper's seed from an Open Assistant export into a seed directory.

    python tools/build_oasst_seed.py 2023-04-12_oasst_ready.trees.jsonl.gz seeds/oasst
    selfreward run data.seed=seeds/oasst

Writes ift.jsonl (English first turns, human rank-0 reply), ranked.jsonl (prompts with >= 2
human-ranked replies, for EFT) and eval_prompts.jsonl (the built-in eval prompts: OASST has no
held-out instruction set; replace the file to use your own), and prints the sizes beside the
paper's (3,200 IFT; EFT 1,630 train / 541 eval). `selfreward run data.oasst_export=EXPORT` builds
the same seed inside a run instead. The work is done by
``megatron_selfreward.data.oasst.build_oasst_seed_dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_selfreward.data.oasst import build_oasst_seed_dir, describe_build


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="OASST *.trees.jsonl or *.trees.jsonl.gz export")
    parser.add_argument("out", type=Path, help="seed directory to write (usable as data.seed=OUT)")
    parser.add_argument("--overwrite", action="store_true", help="replace seed files already in OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    start_s = time.perf_counter()
    try:
        seed, skipped = build_oasst_seed_dir(args.export, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # JsonlError, SeedError: ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} from {args.export} in {time.perf_counter() - start_s:.1f} s")
    print(describe_build(seed, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
