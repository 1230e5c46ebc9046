"""Decode-step GEMMs on a CPU with weights pre-packed for oneDNN (the engine's direct path).

A decode step multiplies a handful of rows by every weight matrix of the model. At that shape
`F.linear` re-lays out the weight for the GEMM kernel on every call; oneDNN can take a weight
packed once into its blocked layout (what inductor's CPU freezing and IPEX do), and fuses the
epilogue the decoder layer needs: the residual add after a row-parallel GEMM, SiLU on the
gate and the gate * up product of SwiGLU. Measured on SmolLM2-135M (2 cores, AMX): about a
fifth less GEMM time in bf16 and in fp32, beyond what skipping the separate epilogue ops saves
(benchmarks/generate_cpu.py).

Packing is a copy: it is a snapshot of the weight (MegatronRunner re-packs when a parameter
changes). Inputs with more rows than `PACKED_MAX_ROWS` (prefill) use the plain weight, where
oneDNN's per-call reorder is amortised anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A packed GEMM is chosen for inputs up to this many rows (decode steps); prefill takes F.linear.
PACKED_MAX_ROWS = 64
# oneDNN picks the packed layout for this many rows; any row count runs on it.
PACK_ROWS_HINT = 16


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN packed GEMMs: CPU tensors, fp32, or bf16 where the CPU has native bf16 (AVX512-BF16/AMX)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear:
    """`x @ weight.T` (no bias) with optional fused epilogues; weight [out, in] of this TP rank.

    With `pack=False` (GPUs, fp16, no oneDNN) every call is plain torch, so callers need only
    one code path.
    """

    def __init__(self, weight: torch.Tensor, pack: bool) -> None:
        self.weight = weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT) if pack else None

    def runs_packed(self, x: torch.Tensor) -> bool:
        """Whether `x` (decode-sized) takes the packed GEMM."""
        return self.packed is not None and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_packed(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.weight)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ W.T)."""
        if self.runs_packed(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "swish", [], "")
        return F.silu(F.linear(x, self.weight))

    def mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x @ W.T) * other."""
        if self.runs_packed(x):
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, None, "mul")
        return F.linear(x, self.weight).mul_(other)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x @ W.T) + other (the residual)."""
        if self.runs_packed(x):
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, None, "add")
        return F.linear(x, self.weight).add_(other)
