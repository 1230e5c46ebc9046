"""CPU kernels for the engine's decode step, built from decode_cpu.cpp on first use.

A decode step on a CPU runs a few hundred small ops besides its GEMMs, each costing a dispatch
and a parallel region on a few kilobytes of data. Two C++ ops replace most of them (what each
computes, op for op, is in decode_cpu_ref.py):

- `decode_attention`: between the QKV GEMM and the output projection of one layer - RoPE on the
  queries and the key, the cache write, GQA attention over the valid columns (and a shared
  prefix held once for all rows), softmax and the sum of values - in one call, in fp32.
- `rms_norm`: one pass per row in fp32 (torch's CPU rms_norm is five ops in bf16).

The library is compiled with torch's extension builder (a C++ compiler and ninja; about 10 s
on 2 cores, once per machine type: the build name hashes the source, the flags, the torch
version and the CPU's instruction-set flags, because `-march=native` code from one node type may
not run on another that shares the cache directory, TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import logging
import platform
import threading
from pathlib import Path

import torch

from megatron_selfreward.kernels.build import extension_name, ninja_on_path

SOURCE = Path(__file__).with_name("decode_cpu.cpp")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
INSTALL_HINT = (
    "the CPU decode kernels need a C++ compiler and ninja (Debian: `apt-get install -y g++`; "
    "`pip install ninja`); or set generation.cpu_kernels: off to run the plain torch path"
)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None}


def _cpu_signature() -> str:
    """The instruction-set flags of this CPU (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name() -> str:
    """Extension name: changes with the source, the flags, torch and the CPU type."""
    return extension_name("selfreward_decode_cpu", SOURCE.read_bytes(), " ".join(CFLAGS).encode(),
                          torch.__version__.encode(), _cpu_signature().encode())


def load(required: bool = False) -> bool:
    """Build (first time on this machine type) and load the ops; True when they are usable.

    required=False: a failed build is logged once and later calls return False at once.
    required=True: a failed build raises with what to install.
    """
    with _lock:
        if _state["loaded"]:
            return True
        if _state["error"] is None:
            try:
                from torch.utils.cpp_extension import load as build

                ninja_on_path()
                build(build_name(), sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"],
                      is_python_module=False, verbose=False)
                _state["loaded"] = True
                return True
            except Exception as exc:  # compiler missing, ninja missing, build error
                _state["error"] = f"{type(exc).__name__}: {exc}"
                _log.warning("CPU decode kernels unavailable, using plain torch ops (%s); %s",
                             _state["error"], INSTALL_HINT)
        if required:
            raise RuntimeError(f"could not build {SOURCE.name}: {_state['error']}; {INSTALL_HINT}")
        return False


def load_error() -> str | None:
    """Why the last build failed (None if it did not, or was not tried)."""
    return _state["error"]  # type: ignore[return-value]


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, valid: torch.Tensor, prefix_keys: torch.Tensor | None,
                     prefix_values: torch.Tensor | None, prefix_len: int, start: int,
                     scale: float) -> torch.Tensor:
    """See decode_cpu_ref.decode_attention_ref (same arguments, same result up to rounding)."""
    return torch.ops.selfreward.decode_attention.default(
        qkv, cos, sin, keys, values, valid, prefix_keys, prefix_values, prefix_len, start, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See decode_cpu_ref.rms_norm_ref."""
    return torch.ops.selfreward.rms_norm.default(x, weight, eps)
