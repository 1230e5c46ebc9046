"""`precision.params_dtype: auto`: the weight dtype this machine computes fastest.

bf16 halves the bytes every GEMM reads, but only hardware with bf16 dot-product instructions
turns that into speed. Measured on 2-core machines of the same kind: a decode-shaped bf16
linear (16x576 by 576x1536, one thread) takes 10.7 ms on an AMD EPYC with AVX2 only, against
0.80 ms in fp32; on an Intel Xeon with AMX-BF16 bf16 is the faster of the two. So:

- CUDA present: bfloat16 (every GPU the GPU presets target has bf16 tensor cores);
- a CPU with AMX-BF16 or AVX512-BF16 (oneDNN's bf16 GEMM paths): bfloat16;
- any other CPU: float32 (bf16 would be converted to fp32 in software around every GEMM).

`resolve_auto(cfg)` runs when a config is loaded, in every process, so each machine decides
for itself: a run directory's config.yaml keeps `auto`, and the concrete dtype and its reason
are what manifests and the report record.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# /proc/cpuinfo flags of the x86 instructions oneDNN's bf16 GEMMs are built on.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]


@dataclass(frozen=True)
class PrecisionChoice:
    params_dtype: str
    reason: str


def read_cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """Model name and instruction-set flags of the first CPU; empty flags where unreadable."""
    model, flags = "", frozenset()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return CpuInfo(model or platform.processor() or platform.machine(), flags)


def choose_params_dtype(cuda: bool, cpu: CpuInfo) -> PrecisionChoice:
    """The dtype `auto` stands for on a machine with (or without) CUDA and this CPU."""
    if cuda:
        return PrecisionChoice("bfloat16", "auto: CUDA GPU (bf16 tensor cores)")
    native = [f for f in NATIVE_BF16_FLAGS if f in cpu.flags]
    if native:
        return PrecisionChoice("bfloat16", f"auto: CPU '{cpu.model}' computes bf16 natively "
                                           f"({', '.join(native)})")
    if not cpu.flags:
        return PrecisionChoice("float32", f"auto: CPU '{cpu.model}': instruction-set flags not "
                                          "readable, so bf16 is not known to be fast")
    return PrecisionChoice("float32", f"auto: CPU '{cpu.model}' has no native bf16 (no "
                                      f"{' or '.join(NATIVE_BF16_FLAGS)}): bf16 GEMMs would run "
                                      "emulated, ~13x slower than fp32")


def detect() -> PrecisionChoice:
    import torch

    return choose_params_dtype(torch.cuda.is_available(), read_cpu_info())


def resolve_auto(cfg: Any, choice: PrecisionChoice | None = None) -> None:
    """Replace `precision.params_dtype: auto` by this machine's dtype, keeping the reason."""
    prec = cfg.precision
    if prec.params_dtype != "auto":
        prec.dtype_choice = ""
        return
    choice = choice or detect()
    prec.params_dtype, prec.dtype_choice = choice.params_dtype, choice.reason


def describe(cfg: Any) -> str:
    """One line for logs and reports: the dtype and, when `auto` chose it, why."""
    prec = cfg.precision
    if prec.dtype_choice:
        return f"{prec.params_dtype} ({prec.dtype_choice})"
    return f"{prec.params_dtype} (set in the config)"
