"""A model directory of a run (M0, M1, ...) loaded as a policy: tokenizer + generation engine
(+ the Megatron model when the engine runs on it).

Layout of `runs/<name>/models/M<t>/`: `megatron/` (a Megatron distributed checkpoint) and/or
`hf/` (a Hugging Face directory: weights and tokenizer), and `trtllm/` (a TensorRT-LLM engine,
built on first use). Weights come from `megatron/` when present, else from `hf/`; the tokenizer
from `hf/`, or bytes for random-init test models.

`generation.engine` picks the engine: `megatron` (default) builds this rank's GPTModel and wraps
it in the in-process KV-cache engine; `trtllm` exports `hf/` from `megatron/` if needed, builds
or reuses `trtllm/` and never builds the Megatron model (`Policy.model` is None).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config, generation_tp
from megatron_selfreward.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


@dataclass
class Policy:
    model: Any  # the Megatron model, or None when the engine does not run on it (trtllm)
    tokenizer: Tokenizer
    engine: Any

    def close(self) -> None:
        """Release what the engine holds outside Python's reach (TensorRT-LLM: GPU memory, workers)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def load_tokenizer(cfg: Config, model_dir: Path) -> Tokenizer:
    for sub in ("hf", "tokenizer"):
        if (model_dir / sub / "tokenizer_config.json").is_file():
            return HFTokenizer(model_dir / sub, cfg.model.chat_template)
    return ByteTokenizer(cfg.model.vocab_size)


def load_weights_into(model: Any, cfg: Config, model_dir: Path) -> None:
    from megatron_selfreward.convert.llama_map import load_hf_into_model
    from megatron_selfreward.megatron.checkpoint import load_model

    if (model_dir / "megatron" / "metadata.json").is_file():
        load_model(model, model_dir / "megatron")
    elif (model_dir / "hf" / "config.json").is_file():
        load_hf_into_model(model, model_dir / "hf", cfg)
    else:
        raise FileNotFoundError(
            f"{model_dir} holds no weights (expected megatron/metadata.json or hf/config.json); "
            "rerun `selfreward run` to (re)create it"
        )


def check_engine_available(cfg: Config) -> None:
    """Refuse an engine this installation cannot run, before any model is loaded."""
    if cfg.generation.engine != "trtllm":
        return
    try:
        import tensorrt_llm  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means "not usable here"
        raise RuntimeError(
            "config key 'generation.engine' is 'trtllm' but TensorRT-LLM cannot be imported "
            f"({type(err).__name__}: {err}). Install it on a CUDA machine from NVIDIA's package "
            "index (see the README, 'Optional GPU extras'), or set generation.engine=megatron."
        ) from err


def load_trtllm_policy(cfg: Config, model_dir: Path) -> Policy:
    """Tokenizer + TensorRT-LLM engine of `model_dir`; no Megatron model is built."""
    from megatron_selfreward.generation.trtllm_build import prepare_model_dir
    from megatron_selfreward.generation.trtllm_engine import TRTLLMEngine

    model_dir = Path(model_dir)
    prepare_model_dir(cfg, model_dir)  # hf/ (with the tokenizer) before the tokenizer is read
    tokenizer = load_tokenizer(cfg, model_dir)
    engine = TRTLLMEngine(cfg, model_dir, tokenizer=tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    return Policy(model=None, tokenizer=tokenizer, engine=engine)


def generation_config(cfg: Config) -> Config:
    """The config a generation model and its world are built with: the generation layout
    (`generation.tensor_parallel_size`, no pipeline parallelism), not training's. The training
    checkpoint reshards on load to it. Sequence parallelism is off: decode steps feed one token
    per row, which cannot be split over TP ranks; megatron's own static inference switches it
    off the same way (`set_model_to_sequence_parallel(model, False)` in megatron.core's
    text_generation_controller); it splits activations, never weights."""
    parallel = replace(cfg.parallel, tensor_model_parallel_size=generation_tp(cfg),
                       pipeline_model_parallel_size=1, sequence_parallel=False, world_size=0)
    return cfg if parallel == cfg.parallel else replace(cfg, parallel=parallel)


def load_policy(cfg: Config, model_dir: Path) -> Policy:
    """The policy of `model_dir` with the configured engine. `megatron`: builds this rank's
    model (needs an initialised world) and loads its weights; `trtllm`: see load_trtllm_policy."""
    check_engine_available(cfg)
    if cfg.generation.engine == "trtllm":
        return load_trtllm_policy(cfg, model_dir)
    from megatron_selfreward.generation.megatron_engine import MegatronEngine
    from megatron_selfreward.megatron.model import build_model

    model = build_model(generation_config(cfg))
    load_weights_into(model, cfg, model_dir)
    model.eval()
    tokenizer = load_tokenizer(cfg, model_dir)
    engine = MegatronEngine(model, cfg, tokenizer=tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    return Policy(model=model, tokenizer=tokenizer, engine=engine)
