"""Export a Megatron checkpoint for TensorRT-LLM, and build a TensorRT engine where asked (GPU clusters).

The default TensorRT-LLM path (generation.trtllm_backend=pytorch) builds nothing: TensorRT-LLM's
PyTorch backend loads the bf16 Hugging Face export (`hf/`) directly, so a new model costs one
export per iteration. The TensorRT-engine path (generation.trtllm_backend=tensorrt) is
TensorRT-LLM's legacy one (removed on its main branch); it is kept here as an option:

- `trtllm-build` path: the Llama example's `convert_checkpoint.py` turns the HF directory into
  a TensorRT-LLM checkpoint sharded for TP/PP, then `trtllm-build` compiles the engine.
- LLM API path: `tensorrt_llm._tensorrt_engine.LLM(model=<hf dir>, tensor_parallel_size=...,
  build_config=BuildConfig(...))` builds the engine from the HF directory and `llm.save(engine_dir)`
  writes it (`generation/trtllm_api.py` says where each supported release keeps these).

Both take the config's TP/PP and length limits: max_seq_len = model.max_seq_len; max_input_len
defaults to max_seq_len minus the longest generation the loop asks for (responses, judgements,
prompts). The engine the pipeline builds for itself (`prepare_model_dir`, used by
`generation/trtllm_engine.py`) allows inputs up to max_seq_len - 1 instead: the short follow-up
requests (forced scores after the cue, pairwise verdicts) carry long prompts, and every stage
already checks prompt + max_new_tokens <= max_seq_len before it asks. An engine that must return
log-probs is built with `gather_generation_logits` (TensorRT-LLM refuses `SamplingParams.logprobs`
otherwise); it is part of the build spec, so such an engine is never confused with one without.

Model directories (`runs/<name>/models/M<t>/`): `hf/` is the bf16 export (exported from
`megatron/` when that is where the weights are, stamped with the source it came from),
`trtllm/` the TensorRT engine when that backend is used, stamped with the build spec and the
same source identity, so it is built once per model and reused while both match.
`tools/build_trtllm_engine.sh` is the command-line entry.

UNVERIFIED ON HARDWARE: TensorRT-LLM cannot be installed where this project is developed, so
the TensorRT-LLM calls are tested against a stand-in (tests/unit/test_trtllm_engine.py, which
runs against the real module where it imports and CUDA is present).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_selfreward.config import Config, generation_tp, load_config
from megatron_selfreward.generation.trtllm_api import (  # noqa: F401 - INSTALL_HINT: this module's name for it
    INSTALL_HINT, build_config_class, check_trtllm_version, tensorrt_llm_class)

__all__ = ["BuildSpec", "build_spec", "export_for_trtllm", "trtllm_build_commands", "build_with_llm_api",
           "engine_llm_class", "prepare_model_dir", "source_identity", "engine_stamp", "engine_is_current",
           "write_engine_stamp"]

BUILD_SPEC_FILE = "trtllm_build.json"
EXPORT_STAMP_FILE = "selfreward_export.json"  # in hf/: which weights it was exported from
ENGINE_STAMP_FILE = "selfreward_engine.json"  # in trtllm/: build spec + source, written last
LOCK_FILE = ".trtllm.lock"  # in the model directory, held while exporting or building
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
    # The engine keeps generation logits, so requests may ask for log-probs (TensorRT backend).
    gather_generation_logits: bool = False


def build_spec(cfg: Config, hf_dir: str | os.PathLike[str], engine_dir: str | os.PathLike[str],
               *, max_input_len: int | None = None, gather_generation_logits: bool = False) -> BuildSpec:
    """The build for `cfg`; max_input_len None = max_seq_len minus the longest generation."""
    longest_output = max(cfg.generation.max_new_tokens, cfg.judge.max_new_tokens,
                         cfg.generation.prompts.max_new_tokens)
    max_seq_len = cfg.model.max_seq_len
    if longest_output >= max_seq_len:
        raise ValueError(
            f"config key 'model.max_seq_len': {max_seq_len} leaves no room for prompts after "
            f"{longest_output} generated tokens (generation/judge max_new_tokens)"
        )
    if max_input_len is not None and not 0 < max_input_len < max_seq_len:
        raise ValueError(f"max_input_len must be in [1, model.max_seq_len={max_seq_len}), got {max_input_len}")
    return BuildSpec(
        hf_dir=str(hf_dir), engine_dir=str(engine_dir),
        # The generation layout, not training's (config.generation_tp): one replica, PP = 1.
        tp_size=generation_tp(cfg), pp_size=1,
        max_batch_size=cfg.generation.batch_size,
        max_input_len=max_seq_len - longest_output if max_input_len is None else max_input_len,
        max_seq_len=max_seq_len, gather_generation_logits=gather_generation_logits,
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
    from megatron_selfreward.megatron.parallel import single_process_world

    spec = build_spec(cfg, hf_dir, engine_dir)
    ckpt = Path(ckpt_dir)
    model_cfg = None if (ckpt / "model_config.yaml").is_file() else cfg.model
    with single_process_world():  # the converter's world (reused if the caller has one)
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


def engine_llm_class() -> type:
    """TensorRT-LLM's engine-building `LLM` class (`tensorrt_llm._tensorrt_engine.LLM`; the
    top-level `LLM` of the supported releases is the PyTorch backend, which builds no engine)."""
    return tensorrt_llm_class()


def build_with_llm_api(spec: BuildSpec, **llm_kwargs: object) -> object:
    """Build the engine through TensorRT-LLM's LLM API (needs GPUs and tensorrt_llm), save it to
    `spec.engine_dir` and return the LLM, ready to generate (extra kwargs go to `LLM`)."""
    check_trtllm_version()
    llm_cls = engine_llm_class()
    limits = dict(max_batch_size=spec.max_batch_size, max_input_len=spec.max_input_len, max_seq_len=spec.max_seq_len)
    if spec.gather_generation_logits:
        limits["gather_generation_logits"] = True  # the engine outputs the logits log-probs come from
        # BaseLLM._check_arguments reads the LLM's own flag, not the engine's, before any logprobs request
        llm_kwargs = {**llm_kwargs, "gather_generation_logits": True}
    build_config = build_config_class()(**limits)
    llm = llm_cls(model=spec.hf_dir, tensor_parallel_size=spec.tp_size, pipeline_parallel_size=spec.pp_size,
                  dtype=spec.dtype, build_config=build_config, **llm_kwargs)
    llm.save(spec.engine_dir)
    return llm


# ---------------------------------------------------------------------------------------------
# A run's model directory: hf/ export and trtllm/ engine, each stamped with its source


@contextlib.contextmanager
def _model_dir_lock(model_dir: Path) -> Iterator[None]:
    """One process at a time exports or builds into a model directory: generation workers
    (data-parallel ranks, array tasks) that load the same model wait for the first one's engine
    and then reuse it."""
    import fcntl

    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def source_identity(model_dir: str | os.PathLike[str]) -> str:
    """What the model's weights are, cheaply: the stage manifest that produced the directory
    (`models/M1.manifest.json`) when there is one, else the names, sizes and mtimes of the
    weight files (a checkpoint is never hashed byte by byte)."""
    import hashlib

    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    manifest = model_dir.parent / f"{model_dir.name}.manifest.json"
    if manifest.is_file():
        digest.update(b"manifest:" + manifest.read_bytes())
        return digest.hexdigest()
    weights = model_dir / "megatron" if (model_dir / "megatron").is_dir() else model_dir / "hf"
    for path in sorted(p for p in weights.rglob("*") if p.is_file()):
        st = path.stat()
        digest.update(f"{path.relative_to(weights)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _export_hf(cfg: Config, model_dir: Path, source: str) -> Path:
    """`hf/` for the engine build: as it is when the weights live there, exported from
    `megatron/` (bf16, stamped with `source`) when they live there; reused while the stamp matches."""
    from megatron_selfreward.convert.hf_megatron import convert_megatron_to_hf
    from megatron_selfreward.io import atomic_write_json
    from megatron_selfreward.megatron.parallel import single_process_world

    hf_dir, ckpt = model_dir / "hf", model_dir / "megatron"
    if not (ckpt / "metadata.json").is_file():
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} holds no weights (expected megatron/metadata.json or "
                                    "hf/config.json); rerun `selfreward run` to (re)create it")
        return hf_dir
    stamp = _read_json(hf_dir / EXPORT_STAMP_FILE)
    if isinstance(stamp, dict) and stamp.get("source") == source and (hf_dir / "config.json").is_file():
        return hf_dir
    if hf_dir.exists() and not isinstance(stamp, dict):
        raise FileExistsError(
            f"{hf_dir} was not exported from {ckpt} (no {EXPORT_STAMP_FILE}); the weights are read from "
            "megatron/, so move hf/ away and the TensorRT-LLM engine will export it again")
    model_cfg = None if (ckpt / "model_config.yaml").is_file() else cfg.model
    tokenizer = model_dir / "tokenizer"
    with single_process_world():  # the converter's world (reused if the caller has one)
        convert_megatron_to_hf(ckpt, hf_dir, dtype=TRTLLM_DTYPE, model_cfg=model_cfg,
                               tokenizer_dir=tokenizer if tokenizer.is_dir() else None, overwrite=True)
    atomic_write_json(hf_dir / EXPORT_STAMP_FILE, {"source": source, "from": "megatron"})
    return hf_dir


def prepare_model_dir(cfg: Config, model_dir: str | os.PathLike[str], *,
                      gather_generation_logits: bool = False) -> tuple[BuildSpec, str]:
    """Make sure `model_dir/hf` holds this model's weights; the build spec (TP/PP and length
    limits, inputs up to max_seq_len - 1; the engine, if one is built, goes to `model_dir/trtllm`)
    and the weights' source identity."""
    model_dir = Path(model_dir)
    with _model_dir_lock(model_dir):
        source = source_identity(model_dir)
        hf_dir = _export_hf(cfg, model_dir, source)
    spec = build_spec(cfg, hf_dir, model_dir / "trtllm", max_input_len=cfg.model.max_seq_len - 1,
                      gather_generation_logits=gather_generation_logits)
    return spec, source


def engine_stamp(spec: BuildSpec, source: str) -> dict[str, object]:
    """What an engine directory must have been built from to be reused."""
    stamp = dataclasses.asdict(spec)
    stamp.pop("engine_dir")  # where it lies does not change what it is
    return {"spec": stamp, "source": source}


def engine_is_current(spec: BuildSpec, source: str) -> bool:
    return _read_json(Path(spec.engine_dir) / ENGINE_STAMP_FILE) == engine_stamp(spec, source)


def write_engine_stamp(spec: BuildSpec, source: str) -> None:
    from megatron_selfreward.io import atomic_write_json

    atomic_write_json(Path(spec.engine_dir) / ENGINE_STAMP_FILE, engine_stamp(spec, source))


def build_engine_for(cfg: Config, model_dir: str | os.PathLike[str], *, force: bool = False,
                     gather_generation_logits: bool = False,
                     **llm_kwargs: object) -> tuple[BuildSpec, object | None]:
    """Build `model_dir/trtllm` (TensorRT backend) unless a matching engine is there: (spec, the
    LLM that built it, ready to generate) after a build, (spec, None) when the engine was reused.
    The stamp is written last, so an interrupted build is redone."""
    import shutil

    spec, source = prepare_model_dir(cfg, model_dir, gather_generation_logits=gather_generation_logits)
    with _model_dir_lock(Path(model_dir)):
        if not force and engine_is_current(spec, source):
            return spec, None
        engine_dir = Path(spec.engine_dir)
        shutil.rmtree(engine_dir, ignore_errors=True)
        llm = build_with_llm_api(spec, **llm_kwargs)
        write_engine_stamp(spec, source)
    return spec, llm


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="run config YAML (TP/PP, lengths)")
    parser.add_argument("--model-dir", type=Path,
                        help="a run's model directory (models/M<t>): export hf/ if needed and, with "
                             "generation.trtllm_backend=tensorrt, build trtllm/ exactly as generation.engine=trtllm "
                             "does (reused while current); replaces --ckpt/--hf-out/--engine-out")
    parser.add_argument("--ckpt", type=Path, help="Megatron checkpoint directory")
    parser.add_argument("--hf-out", type=Path, help="bf16 HF directory to create")
    parser.add_argument("--engine-out", type=Path, help="engine directory to create")
    parser.add_argument("--method", choices=("llm-api", "trtllm-build", "export-only"), default="llm-api")
    parser.add_argument("--convert-script", default="",
                        help="TensorRT-LLM's examples/.../llama/convert_checkpoint.py (trtllm-build method)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. generation.tensor_parallel_size=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.model_dir is not None:
        if cfg.generation.trtllm_backend == "pytorch":
            # TensorRT-LLM's PyTorch backend loads hf/ as it is: exporting it is all there is to do.
            spec, _ = prepare_model_dir(cfg, args.model_dir)
            print(json.dumps({"hf_dir": spec.hf_dir, "trtllm_backend": "pytorch", "built": False}, indent=2))
            return 0
        spec, llm = build_engine_for(cfg, args.model_dir, force=args.overwrite)
        print(json.dumps({**dataclasses.asdict(spec), "built": llm is not None}, indent=2))
        if llm is not None and hasattr(llm, "shutdown"):
            llm.shutdown()
        return 0
    if args.ckpt is None or args.hf_out is None or args.engine_out is None:
        raise SystemExit("give --model-dir, or all of --ckpt, --hf-out and --engine-out")
    spec = export_for_trtllm(cfg, args.ckpt, args.hf_out, args.engine_out, overwrite=args.overwrite)
    print(json.dumps(dataclasses.asdict(spec), indent=2))
    if args.method == "llm-api":
        llm = build_with_llm_api(spec)
        if hasattr(llm, "shutdown"):
            llm.shutdown()
    elif args.method == "trtllm-build":
        if not args.convert_script:
            raise SystemExit("--method trtllm-build needs --convert-script (TensorRT-LLM's llama example)")
        for cmd in trtllm_build_commands(spec, args.convert_script, str(args.engine_out) + ".work"):
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
