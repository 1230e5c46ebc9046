"""kernels/decode_cpu.cpp against its plain-torch reference (kernels/decode_cpu_ref.py).

The ops are built here (a C++ compiler is part of this project's test machine, see README); the
engine-level tests (test_megatron_engine.py) then check whole generations through them against
a full recompute of the model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_selfreward.kernels import decode_cpu
from megatron_selfreward.kernels.decode_cpu_ref import decode_attention_ref, rms_norm_ref

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert decode_cpu.load(required=True)


def rope_tables(rows: int, rot: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(rows, rot // 2, generator=gen) * 2 * math.pi
    return torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)


def case(dtype: torch.dtype, dim: int, rot: int, per_group: int, prefix: int, start: int,
         seed: int = 0) -> dict:
    """Random inputs; unwritten cache columns (after `start`) and padding columns hold NaN, which
    must never reach an output."""
    gen = torch.Generator().manual_seed(seed)
    rows, groups, max_len = 5, 3, start + 7
    cos, sin = rope_tables(rows, rot, gen)
    keys = torch.randn(rows, groups, max_len, dim, generator=gen).to(dtype)
    values = torch.randn(rows, groups, max_len, dim, generator=gen).to(dtype)
    valid = torch.rand(rows, max_len, generator=gen) > 0.3
    valid[1, prefix:] = True  # one row without padding
    valid[2, start] = False  # a padding query (a prefill chunk of one column) sees itself only
    valid[:, start + 1:] = False
    for t in (keys, values):
        t[:, :, start:] = math.nan
        t.masked_fill_(~valid[:, None, :, None] & (torch.arange(max_len) < start)[None, None, :, None],
                       math.nan)
    prefix_keys = prefix_values = None
    if prefix:
        prefix_keys = torch.randn(1, groups, prefix + 3, dim, generator=gen).to(dtype)
        prefix_values = torch.randn(1, groups, prefix + 3, dim, generator=gen).to(dtype)
        keys[:, :, :prefix] = values[:, :, :prefix] = math.nan  # attention takes the prefix instead
    qkv = torch.randn(rows, groups, per_group + 2, dim, generator=gen).to(dtype)
    return dict(qkv=qkv, cos=cos, sin=sin, keys=keys, values=values, valid=valid,
                prefix_keys=prefix_keys, prefix_values=prefix_values, prefix_len=prefix,
                start=start, scale=dim ** -0.5)


def cloned(inputs: dict) -> dict:
    """The same arguments with tensors copied (the op writes the cache in place)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "dim, rot, per_group, prefix, start",
    [
        (64, 64, 3, 0, 41),  # SmolLM2's heads: the register-blocked path
        (64, 32, 1, 37, 60),  # partial rotary, MHA, a shared prefix
        (128, 128, 2, 5, 5),  # first step after the prefix: own column only
        (64, 64, 5, 0, 20),  # heads in blocks of 4 + 1
        (24, 24, 3, 19, 30),  # a head size without blocked code: the generic path
    ],
)
def test_decode_attention_equals_reference(dtype, dim, rot, per_group, prefix, start) -> None:
    inputs = case(dtype, dim, rot, per_group, prefix, start)
    ours, ref = cloned(inputs), cloned(inputs)
    out = decode_cpu.decode_attention(*ours.values())
    expected = decode_attention_ref(*ref.values())
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    # The cache: column `start` holds the rotated key and the value, nothing else changed.
    torch.testing.assert_close(ours["keys"][:, :, start], ref["keys"][:, :, start], **TOLERANCE[dtype])
    assert torch.equal(ours["values"][:, :, start], inputs["qkv"][:, :, per_group + 1])
    others = torch.arange(inputs["keys"].shape[2]) != start
    for name in ("keys", "values"):
        torch.testing.assert_close(ours[name][:, :, others], inputs[name][:, :, others],
                                   rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("scale", [4.0, 1e-3])
def test_decode_attention_peaked_and_flat_scores(scale) -> None:
    """Scores spread over hundreds (most exps underflow, the softmax nearly one-hot) or nearly
    equal (a plain average): the vectorised exp and the sums hold in both."""
    inputs = dict(case(torch.float32, 64, 64, 3, 21, 70, seed=5), scale=scale)
    out = decode_cpu.decode_attention(*cloned(inputs).values())
    expected = decode_attention_ref(*cloned(inputs).values())
    # Scores of a few hundred carry fp32 rounding of ~1e-5 (summation order), which the softmax
    # passes on to the weights.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 1, 576), (300, 96)])  # decode rows; enough rows to split
def test_rms_norm_equals_reference_and_torch(dtype, shape) -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    out = decode_cpu.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-5), **TOLERANCE[dtype])
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), weight, 1e-5), **TOLERANCE[dtype])


def test_bad_arguments_are_clear_errors() -> None:
    inputs = case(torch.float32, 64, 64, 3, 0, 10)
    bad = [
        (dict(keys=inputs["keys"].bfloat16()), "the cache must have qkv's dtype"),
        (dict(qkv=inputs["qkv"].transpose(2, 3)), "contiguous"),
        (dict(start=inputs["keys"].shape[2]), "start must lie in"),
        (dict(prefix_len=4), "prefix_len > 0 needs the prefix tensors"),
        (dict(qkv=inputs["qkv"].half(), keys=inputs["keys"].half(), values=inputs["values"].half()),
         "float32 or bfloat16"),
    ]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            decode_cpu.decode_attention(*dict(inputs, **change).values())
    with pytest.raises(RuntimeError, match="selfreward::rms_norm"):
        decode_cpu.rms_norm(torch.ones(4, 8), torch.ones(7), 1e-5)


def test_build_name_follows_the_cpu_type(monkeypatch) -> None:
    """-march=native code is per CPU type: another instruction set must not reuse the build."""
    here = decode_cpu.build_name()
    monkeypatch.setattr(decode_cpu, "_cpu_signature", lambda: "sse2")
    assert decode_cpu.build_name() != here


def test_unbuildable_kernels_fail_clearly_when_required(monkeypatch) -> None:
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(decode_cpu, "_state", {"loaded": False, "error": None})
    assert decode_cpu.load() is False  # auto: a warning, the torch path
    assert "c++: not found" in decode_cpu.load_error()
    with pytest.raises(RuntimeError, match="apt-get install -y g\\+\\+"):
        decode_cpu.load(required=True)
