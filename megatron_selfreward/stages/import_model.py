"""Stage `import_model`: bring the base model M0 into the run directory.

gguf -> `models/M0/hf` (dequantized safetensors + tokenizer); hf -> `models/M0/hf` links to the
user's directory (no copy of a 140 GB checkpoint); megatron -> `models/M0/megatron` links to the
checkpoint; random -> a freshly initialised Megatron checkpoint (test presets).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from megatron_selfreward.config import Config, ConfigError
from megatron_selfreward.convert.hf_checkpoint import read_hf_config
from megatron_selfreward.convert.llama_map import check_same_architecture
from megatron_selfreward.stages.manifest import fingerprint, is_done, write_manifest


def resolve_model_path(path: str) -> Path:
    if path == "builtin:smollm2":
        from megatron_selfreward.assets import smollm2_gguf_path

        return smollm2_gguf_path()
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ConfigError(f"config key 'model.path': {resolved} does not exist")
    return resolved


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target.resolve(), link)


def _save_random(cfg: Config, directory: Path) -> None:
    from megatron_selfreward.megatron.checkpoint import save_model
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    with single_process_world(cfg.pipeline.seed):
        save_model(build_model(cfg), directory)


def run_import_model(cfg: Config, run_dir: Path) -> Path:
    out = run_dir / "models" / "M0"
    m = cfg.model
    source = resolve_model_path(m.path) if m.source != "random" else None
    fp = fingerprint({"source": source} if source and source.is_file() else {},
                     {"source": m.source, "path": str(source or ""), "seed": cfg.pipeline.seed})
    if is_done(out, fp):
        return out
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if m.source == "gguf":
        from megatron_selfreward.convert.gguf import import_gguf

        import_gguf(source, out / "hf", overwrite=True)
    elif m.source == "hf":
        _link(source, out / "hf")
    elif m.source == "megatron":
        _link(source, out / "megatron")
    else:
        _save_random(cfg, out / "megatron")
    if (out / "hf" / "config.json").is_file():
        # Fail here, not at the first model load, when the config describes another model.
        check_same_architecture(cfg, read_hf_config(out / "hf"), f"{out / 'hf'}/config.json")
    write_manifest(out, "import_model", fp, {"source": m.source}, started)
    return out
