"""Export a Megatron checkpoint for TensorRT-LLM and build its engine (GPU clusters only).

UNVERIFIED: TensorRT-LLM cannot be installed on the development machines or the lent GPU
machine (see ../shared/platform-notes.md), so only the export half (`export_for_trtllm`,
Megatron -> bf16 Hugging Face directory, which reuses the tested `convert_megatron_to_hf`) and
the construction of the build commands are exercised by tests. The build half follows the
documented TensorRT-LLM interfaces:

- `trtllm-build` path: the Llama example's `convert_checkpoint.py` turns the HF directory into
  a TensorRT-LLM checkpoint sharded for TP/PP, then `trtllm-build` compiles the engine.
- LLM API path: `LLM(model=<hf dir>, tensor_parallel_size=..., build_config=BuildConfig(...))`
  builds the engine directly from the HF directory and `llm.save(engine_dir)` writes it.

Both take the config's TP/PP and length limits: max_seq_len = model.max_seq_len, max_input_len =
max_seq_len minus the longest generation the loop asks for (responses, judgements, prompts).
`tools/build_trtllm_engine.sh` is the command-line entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_selfreward.config import Config, load_config

__all__ = ["BuildSpec", "build_spec", "export_for_trtllm", "trtllm_build_commands", "build_with_llm_api"]

BUILD_SPEC_FILE = "trtllm_build.json"
TRTLLM_DTYPE = "bfloat16"  # TRT-LLM's native dtype for Llama engines without quantization


@dataclass(frozen=True)
class BuildSpec:
    """Everything an engine build needs, written beside the exported HF directory."""

    hf_dir: str
    engine_dir: str
    tp_size: int
    pp_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    dtype: str = TRTLLM_DTYPE


def build_spec(cfg: Config, hf_dir: str | os.PathLike[str], engine_dir: str | os.PathLike[str]) -> BuildSpec:
    longest_output = max(cfg.generation.max_new_tokens, cfg.judge.max_new_tokens,
                         cfg.generation.prompts.max_new_tokens)
    max_seq_len = cfg.model.max_seq_len
    if longest_output >= max_seq_len:
        raise ValueError(
            f"config key 'model.max_seq_len': {max_seq_len} leaves no room for prompts after "
            f"{longest_output} generated tokens (generation/judge max_new_tokens)"
        )
    return BuildSpec(
        hf_dir=str(hf_dir), engine_dir=str(engine_dir),
        tp_size=cfg.parallel.tensor_model_parallel_size, pp_size=cfg.parallel.pipeline_model_parallel_size,
        max_batch_size=cfg.generation.batch_size, max_input_len=max_seq_len - longest_output,
        max_seq_len=max_seq_len,
    )


def export_for_trtllm(
    cfg: Config,
    ckpt_dir: str | os.PathLike[str],
    hf_dir: str | os.PathLike[str],
    engine_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> BuildSpec:
    """Megatron checkpoint -> bf16 HF directory + `trtllm_build.json` describing the build."""
    from megatron_selfreward.convert.hf_megatron import convert_megatron_to_hf
    from megatron_selfreward.io import atomic_write_json

    spec = build_spec(cfg, hf_dir, engine_dir)
    ckpt = Path(ckpt_dir)
    model_cfg = None if (ckpt / "model_config.yaml").is_file() else cfg.model
    convert_megatron_to_hf(ckpt, hf_dir, dtype=TRTLLM_DTYPE, model_cfg=model_cfg, overwrite=overwrite)
    atomic_write_json(Path(hf_dir) / BUILD_SPEC_FILE, dataclasses.asdict(spec))
    return spec


def trtllm_build_commands(spec: BuildSpec, convert_script: str, work_dir: str) -> list[list[str]]:
    """argv lists for the two-step path: Llama convert_checkpoint.py, then trtllm-build."""
    trt_ckpt = str(Path(work_dir) / "trtllm_checkpoint")
    convert = [sys.executable, convert_script, "--model_dir", spec.hf_dir, "--output_dir", trt_ckpt,
               "--dtype", spec.dtype, "--tp_size", str(spec.tp_size), "--pp_size", str(spec.pp_size)]
    build = ["trtllm-build", "--checkpoint_dir", trt_ckpt, "--output_dir", spec.engine_dir,
             "--gemm_plugin", "auto", "--max_batch_size", str(spec.max_batch_size),
             "--max_input_len", str(spec.max_input_len), "--max_seq_len", str(spec.max_seq_len)]
    return [convert, build]


def build_with_llm_api(spec: BuildSpec) -> None:
    """Build and save the engine through TensorRT-LLM's LLM API (needs GPUs and tensorrt_llm)."""
    try:
        # TensorRT-LLM >= 1.0 keeps the engine-building LLM here (its top-level LLM is the
        # PyTorch backend, which builds no engine); older releases export it at the top level.
        from tensorrt_llm._tensorrt_engine import LLM  # type: ignore[import-not-found]
    except ImportError:
        try:
            from tensorrt_llm import LLM  # type: ignore[import-not-found]
        except ImportError as err:
            raise RuntimeError("tensorrt_llm is not installed (GPU clusters only; see README)") from err
    from tensorrt_llm import BuildConfig  # type: ignore[import-not-found]

    build_config = BuildConfig(max_batch_size=spec.max_batch_size, max_input_len=spec.max_input_len,
                               max_seq_len=spec.max_seq_len)
    llm = LLM(model=spec.hf_dir, tensor_parallel_size=spec.tp_size, pipeline_parallel_size=spec.pp_size,
              dtype=spec.dtype, build_config=build_config)
    llm.save(spec.engine_dir)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="run config YAML (TP/PP, lengths)")
    parser.add_argument("--ckpt", type=Path, required=True, help="Megatron checkpoint directory")
    parser.add_argument("--hf-out", type=Path, required=True, help="bf16 HF directory to create")
    parser.add_argument("--engine-out", type=Path, required=True, help="engine directory to create")
    parser.add_argument("--method", choices=("llm-api", "trtllm-build", "export-only"), default="llm-api")
    parser.add_argument("--convert-script", default="",
                        help="TensorRT-LLM's examples/.../llama/convert_checkpoint.py (trtllm-build method)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tensor_model_parallel_size=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    spec = export_for_trtllm(cfg, args.ckpt, args.hf_out, args.engine_out, overwrite=args.overwrite)
    print(json.dumps(dataclasses.asdict(spec), indent=2))
    if args.method == "llm-api":
        build_with_llm_api(spec)
    elif args.method == "trtllm-build":
        if not args.convert_script:
            raise SystemExit("--method trtllm-build needs --convert-script (TensorRT-LLM's llama example)")
        for cmd in trtllm_build_commands(spec, args.convert_script, str(args.engine_out) + ".work"):
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
