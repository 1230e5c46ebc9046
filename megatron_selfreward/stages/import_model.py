"""Stage `import_model`: bring the base model M0 into the run directory.

gguf -> `models/M0/hf` (dequantized safetensors + tokenizer); hf -> `models/M0/hf` links to the
user's directory (no copy of a 140 GB checkpoint); megatron -> `models/M0/megatron` links to the
checkpoint; random -> a freshly initialised Megatron checkpoint (test presets).

The user's model is checked here, and errors name the user's files: a GGUF's header and tensor
extents against its size (`convert.gguf`), a HF directory's config.json and every safetensors
header against its file's size (`convert.hf_checkpoint`), and the config against the model's
architecture. The plan names the source, the output directory and the fingerprint (which holds
the source's identity, `pipeline/params.py::import_params`, so a file changed at the same path is
imported again, not silently reused); the executor passes them in, and opens the process world
a random initialisation builds its model in.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config, ConfigError
from megatron_selfreward.convert.hf_checkpoint import HFCheckpointError, HFWeights, read_hf_config
from megatron_selfreward.convert.llama_map import check_same_architecture
from megatron_selfreward.stages.manifest import is_done, write_manifest


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target.resolve(), link)


def _save_random(cfg: Config, directory: Path) -> None:
    """Needs the 1-process world (megatron's parallel state) the executor opened."""
    from megatron_selfreward.megatron.checkpoint import save_model
    from megatron_selfreward.megatron.model import build_model

    save_model(build_model(cfg), directory)


def _check_architecture(cfg: Config, hf_config: dict[str, Any], where: str) -> None:
    try:
        check_same_architecture(cfg, hf_config, where)
    except HFCheckpointError:
        raise
    except ValueError as err:  # the model is fine; the config describes another one
        raise ConfigError(f"config key 'model': {err}") from err


def _check_hf_source(cfg: Config, source: Path) -> None:
    """Refuse a broken HF directory here, naming its files, not at its first load from our link."""
    if not source.is_dir():
        raise HFCheckpointError(f"{source}: model.source=hf needs a Hugging Face model directory "
                                "(config.json + model.safetensors or shards with their index)")
    hf_config = read_hf_config(source)
    HFWeights(source)  # parses every safetensors header; each tensor's bytes must lie in its file
    _check_architecture(cfg, hf_config, str(source / "config.json"))


def run_import_model(cfg: Config, source: Path | None, out: Path, fp: dict[str, Any]) -> Path:
    """Import `source` (None: random init) as the model directory `out`; its manifest holds `fp`."""
    m = cfg.model
    if is_done(out, fp):
        return out
    started = time.time()
    if m.source == "hf":
        _check_hf_source(cfg, source)
    out.mkdir(parents=True, exist_ok=True)
    if m.source == "gguf":
        from megatron_selfreward.convert.gguf import import_gguf

        import_gguf(source, out / "hf", overwrite=True)  # checks the file before writing anything
        _check_architecture(cfg, read_hf_config(out / "hf"), f"{source} (as {out / 'hf'}/config.json)")
    elif m.source == "hf":
        _link(source, out / "hf")
    elif m.source == "megatron":
        _link(source, out / "megatron")
    else:
        _save_random(cfg, out / "megatron")
    write_manifest(out, "import_model", fp, {"source": m.source}, started)
    return out
