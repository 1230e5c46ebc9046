"""A model directory of a run (M0, M1, ...) loaded as a policy: Megatron model + tokenizer + engine.

Layout of `runs/<name>/models/M<t>/`: `megatron/` (a Megatron distributed checkpoint) and/or
`hf/` (a Hugging Face directory: weights and tokenizer). Weights come from `megatron/` when
present, else from `hf/`; the tokenizer from `hf/`, or bytes for random-init test models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config
from megatron_selfreward.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


@dataclass
class Policy:
    model: Any
    tokenizer: Tokenizer
    engine: Any


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
    raise RuntimeError(
        "config key 'generation.engine': the TensorRT-LLM engine is not part of this release yet; "
        "export with `selfreward convert megatron-to-hf` + tools/build_trtllm_engine.sh, or set "
        "generation.engine=megatron (the in-process KV-cache engine, CPU and GPU)."
    )


def load_policy(cfg: Config, model_dir: Path) -> Policy:
    """Build this rank's model (needs an initialised world), load weights, wrap an engine."""
    from megatron_selfreward.generation.megatron_engine import MegatronEngine
    from megatron_selfreward.megatron.model import build_model

    check_engine_available(cfg)
    model = build_model(cfg)
    load_weights_into(model, cfg, model_dir)
    model.eval()
    tokenizer = load_tokenizer(cfg, model_dir)
    engine = MegatronEngine(model, cfg, tokenizer=tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    return Policy(model=model, tokenizer=tokenizer, engine=engine)
