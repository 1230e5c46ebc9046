"""PackedLinear: oneDNN-packed GEMMs with fused epilogues equal plain torch (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_selfreward.generation.packed_linear import PACKED_MAX_ROWS, PackedLinear, packing_supported


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, PACKED_MAX_ROWS + 1])
def test_packed_equals_plain(dtype: torch.dtype, rows: int) -> None:
    if not packing_supported(dtype, torch.device("cpu")):
        pytest.skip(f"no oneDNN packed GEMM for {dtype} on this CPU")
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=gen) * 0.1).to(dtype)
    x = torch.randn(rows, 1, 64, generator=gen).to(dtype)
    other = torch.randn(rows, 1, 96, generator=gen).to(dtype)
    packed, plain = PackedLinear(weight, pack=True), PackedLinear(weight, pack=False)
    assert packed.runs_packed(x) == (rows <= PACKED_MAX_ROWS) and not plain.runs_packed(x)
    ref = F.linear(x.float(), weight.float())
    # bf16: one rounding of the fp32 accumulator (values ~1: 2^-8 relative)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for layer in (packed, plain):
        torch.testing.assert_close(layer(x).float(), ref, **tol)
        torch.testing.assert_close(layer.silu(x).float(), F.silu(ref), **tol)
        torch.testing.assert_close(layer.mul(x, other).float(), ref * other.float(), **tol)
        torch.testing.assert_close(layer.add(x, other).float(), ref + other.float(), **tol)
        assert layer(x).dtype == dtype and layer(x).shape == (rows, 1, 96)


def test_packing_is_cpu_only() -> None:
    assert not packing_supported(torch.float32, torch.device("meta"))
    assert not packing_supported(torch.float16, torch.device("cpu"))
