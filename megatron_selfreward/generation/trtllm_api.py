"""The supported TensorRT-LLM releases, and where each keeps the parts of its API we call.

Supported: TensorRT-LLM >= 1.0 (`SUPPORTED_TRTLLM`, checked when a TRTLLMEngine is created).
What the supported releases agree on, read from TensorRT-LLM's sources (1.0, 1.x, main):

- `tensorrt_llm.LLM` is the PyTorch-backend LLM (`_TorchLLM` in tensorrt_llm/llmapi/llm.py): it
  loads a Hugging Face directory as it is, nothing is built. It refuses TensorRT-only arguments
  such as `build_config` (`_TorchLLM._validate_args_for_torch_backend`).
- `tensorrt_llm._tensorrt_engine.LLM` is the TensorRT-engine LLM (`_TrtLLM`), upstream's legacy
  path: it builds an engine from the HF directory (`BuildConfig`) or loads a saved one. Upstream
  main has since removed this backend, so a release may lack the module.
- `BuildConfig` is `tensorrt_llm.llmapi.BuildConfig`; the top-level `tensorrt_llm.BuildConfig`
  of the 1.x releases is gone on main.
"""

from __future__ import annotations

import re
from typing import Any

MIN_TRTLLM_VERSION = "1.0.0"
SUPPORTED_TRTLLM = f">={MIN_TRTLLM_VERSION}"
INSTALL_HINT = (f"install TensorRT-LLM {SUPPORTED_TRTLLM} on a CUDA machine (pip install "
                f"'tensorrt-llm{SUPPORTED_TRTLLM}', or an NGC TensorRT-LLM container; see the README, "
                "'Optional GPU extras'), or set generation.engine=megatron")


def import_trtllm() -> Any:
    try:
        import tensorrt_llm  # type: ignore[import-not-found]
    except ImportError as err:
        raise RuntimeError(f"tensorrt_llm cannot be imported ({err}); {INSTALL_HINT}") from err
    return tensorrt_llm


def installed_version(module: Any) -> str | None:
    version = getattr(module, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("tensorrt_llm")
        except metadata.PackageNotFoundError:
            return None
    return str(version)


def _is_supported(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version(MIN_TRTLLM_VERSION)
    except InvalidVersion:
        # A local build may carry a suffix packaging rejects; judge it by its leading X.Y.Z.
        match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
        return bool(match) and tuple(int(p or 0) for p in match.groups()) >= (1, 0, 0)


def check_trtllm_version(module: Any | None = None) -> str:
    """The installed TensorRT-LLM's version; a RuntimeError saying what to install when it is
    outside `SUPPORTED_TRTLLM` (pre-releases of 1.0 included: their API is not 1.0's)."""
    module = import_trtllm() if module is None else module
    version = installed_version(module)
    if version is None or not _is_supported(version):
        found = f"TensorRT-LLM {version}" if version else "a TensorRT-LLM whose version cannot be read"
        raise RuntimeError(f"generation.engine=trtllm: {found} is installed, TensorRT-LLM "
                           f"{SUPPORTED_TRTLLM} is supported; {INSTALL_HINT}")
    return version


def pytorch_llm_class() -> type:
    """The PyTorch-backend LLM (top-level `tensorrt_llm.LLM` in every supported release)."""
    return import_trtllm().LLM


def tensorrt_llm_class() -> type:
    """The TensorRT-engine LLM (`tensorrt_llm._tensorrt_engine.LLM`), for
    generation.trtllm_backend=tensorrt."""
    module = import_trtllm()
    try:
        from tensorrt_llm._tensorrt_engine import LLM  # type: ignore[import-not-found]
    except Exception as err:  # noqa: BLE001 - missing or refusing to import: no such backend here
        raise RuntimeError(
            f"generation.trtllm_backend=tensorrt: TensorRT-LLM {installed_version(module)} has no TensorRT "
            f"engine backend (tensorrt_llm._tensorrt_engine: {err}); set generation.trtllm_backend=pytorch "
            "(the default: loads the HF export directly, no engine build)") from err
    return LLM


def build_config_class() -> type:
    """`BuildConfig` (TensorRT backend only): `tensorrt_llm.llmapi` first, then the top level."""
    import_trtllm()
    try:
        from tensorrt_llm.llmapi import BuildConfig  # type: ignore[import-not-found]
    except ImportError:
        from tensorrt_llm import BuildConfig  # type: ignore[import-not-found]
    return BuildConfig
