"""kernels/logprobs.py against the reference: values and gradients, Triton (interpreted) and torch.

Triton's interpreter is chosen when a kernel is *decorated*, i.e. when megatron_selfreward.kernels.logprobs is first
imported, and only if TRITON_INTERPRET=1 is in the environment then. Setting it from a test
module is unreliable (another module may import it first during collection), so
the Triton checks run this file as a script in a subprocess with the variable set, print their
errors as JSON, and the tests below assert on them. The torch fallback is tested in-process.
Shapes are tiny on purpose: the interpreter executes every program instance in Python.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

# (name, leading shape, H, V, blocks): ragged everywhere - T, V and H not multiples of the blocks.
CASES = [
    ("ragged", (37,), 40, 101, (16, 32, 16)),
    ("exact_blocks", (32,), 32, 64, (16, 32, 16)),
    ("fewer_tokens_than_block", (5,), 33, 70, (16, 32, 16)),
    ("batched_and_one_chunk", (2, 7), 24, 20, (16, 32, 16)),
]
ATOL, RTOL = 2e-5, 1e-5  # fp32: the kernels sum in a different order than one big GEMM


def _inputs(lead: tuple, H: int, V: int, scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, H, generator=gen) * scale).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, lead, generator=gen)
    grad_out = torch.randn(*lead, generator=gen)
    return hidden, weight, targets, grad_out


def _errors(fn, lead: tuple, H: int, V: int, scale: float = 1.0) -> dict[str, float]:
    """Max |fn - reference| of the values and of both gradients, and the reference magnitudes."""
    from megatron_selfreward.kernels.logprobs_ref import logprobs_reference

    hidden, weight, targets, grad_out = _inputs(lead, H, V, scale)
    ref = logprobs_reference(hidden, weight, targets)
    ref_dh, ref_dw = torch.autograd.grad((ref * grad_out).sum(), (hidden, weight))
    out = fn(hidden, weight, targets)
    dh, dw = torch.autograd.grad((out * grad_out).sum(), (hidden, weight))
    assert out.shape == ref.shape and out.dtype == torch.float32
    return {
        "value": (out - ref).abs().max().item(), "value_ref": ref.abs().max().item(),
        "dh": (dh - ref_dh).abs().max().item(), "dh_ref": ref_dh.abs().max().item(),
        "dw": (dw - ref_dw).abs().max().item(), "dw_ref": ref_dw.abs().max().item(),
    }


def _assert_close(errors: dict[str, float]) -> None:
    for key in ("value", "dh", "dw"):
        assert errors[key] <= ATOL + RTOL * errors[f"{key}_ref"], (key, errors)


def _bf16_errors(fn) -> dict[str, float]:
    """Relative gradient errors of bf16 inputs against the fp32 reference on the same values."""
    from megatron_selfreward.kernels.logprobs_ref import logprobs_reference

    hidden, weight, targets, grad_out = _inputs((20,), 32, 50)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    h32, w32 = (t.detach().float().requires_grad_() for t in (h16, w16))
    ref = logprobs_reference(h32, w32, targets)
    (ref * grad_out).sum().backward()
    out = fn(h16, w16, targets)
    (out * grad_out).sum().backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    return {
        # Logits are summed in fp32 from exact bf16 products: values stay fp32-accurate.
        "value": (out - ref).abs().max().item(),
        # dlogits are rounded to bf16 before the gradient GEMMs, and the grads stored in bf16.
        "dh_rel": ((h16.grad.float() - h32.grad).abs().max() / h32.grad.abs().max()).item(),
        "dw_rel": ((w16.grad.float() - w32.grad).abs().max() / w32.grad.abs().max()).item(),
    }


def _assert_bf16_close(errors: dict[str, float]) -> None:
    assert errors["value"] <= 1e-4 and errors["dh_rel"] <= 2e-2 and errors["dw_rel"] <= 2e-2, errors


def _triton_checks() -> dict:
    """Runs in the subprocess, with TRITON_INTERPRET=1 set before triton is imported."""
    from megatron_selfreward.kernels.logprobs import triton_logprobs

    results: dict = {}
    for name, lead, H, V, blocks in CASES:
        results[name] = _errors(lambda h, w, y, b=blocks: triton_logprobs(h, w, y, b), lead, H, V)
    # Logits around +-100: the online log-sum-exp must not overflow where exp(logit) would.
    results["large_logits"] = _errors(
        lambda h, w, y: triton_logprobs(h, w, y, (16, 32, 16)), (20,), 16, 50, scale=60.0)
    # A frozen weight (the DPO reference model is all-frozen): only dh is computed.
    hidden, weight, targets, grad_out = _inputs((9,), 16, 40)
    weight.requires_grad_(False)
    out = triton_logprobs(hidden, weight, targets, (16, 32, 16))
    (dh,) = torch.autograd.grad((out * grad_out).sum(), (hidden,))
    results["frozen_weight_dh_finite"] = bool(torch.isfinite(dh).all())
    results["bf16"] = _bf16_errors(lambda h, w, y: triton_logprobs(h, w, y, (16, 32, 16)))
    return results


@pytest.fixture(scope="module")
def triton_results() -> dict:
    pytest.importorskip("triton")
    from tests.conftest import REPO, run_python

    proc = run_python([str(REPO / "tests/unit/test_kernel_logprobs.py")],
                      env={"TRITON_INTERPRET": "1"}, timeout=600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in CASES] + ["large_logits"])
def test_triton_kernel_matches_reference(triton_results, name):
    _assert_close(triton_results[name])


def test_triton_kernel_with_frozen_weight(triton_results):
    assert triton_results["frozen_weight_dh_finite"]


@pytest.mark.parametrize("name, lead, H, V, chunk", [
    ("ragged_chunks", (37,), 40, 101, 32),
    ("chunk_larger_than_vocab", (5,), 8, 30, 64),
    ("batched", (2, 7), 24, 20, 7),
])
def test_chunked_torch_matches_reference(name, lead, H, V, chunk):
    from megatron_selfreward.kernels.logprobs import chunked_logprobs_torch

    _assert_close(_errors(lambda h, w, y: chunked_logprobs_torch(h, w, y, chunk), lead, H, V))


def test_triton_kernel_bf16(triton_results):
    _assert_bf16_close(triton_results["bf16"])


def test_chunked_torch_bf16():
    from megatron_selfreward.kernels.logprobs import chunked_logprobs_torch

    _assert_bf16_close(_bf16_errors(lambda h, w, y: chunked_logprobs_torch(h, w, y, 16)))


def test_chunked_torch_saves_no_logits():
    from megatron_selfreward.kernels.logprobs import chunked_logprobs_torch

    hidden, weight, targets, _ = _inputs((12,), 8, 50)
    out = chunked_logprobs_torch(hidden, weight, targets, chunk=16)
    # What backward keeps: hidden, weight, targets and lse [T] - nothing of size T x V.
    node = out.grad_fn
    while not node.name().startswith("_ChunkedLogprobs"):
        node = node.next_functions[0][0]
    assert all(t.numel() < 12 * 50 for t in node.saved_tensors if t is not weight)


def test_dispatch_without_interpreter_uses_torch_on_cpu(monkeypatch):
    from megatron_selfreward.kernels.logprobs import logprobs, triton_usable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_usable(torch.device("cpu"))
    hidden, weight, targets, _ = _inputs((6,), 8, 20)
    torch.testing.assert_close(logprobs(hidden, weight, targets, chunk=8),
                               logprobs(hidden, weight, targets, impl="reference"))
    with pytest.raises(ValueError, match="impl"):
        logprobs(hidden, weight, targets, impl="cuda")


if __name__ == "__main__":
    # The subprocess half of the Triton tests (see the module docstring).
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    print(json.dumps(_triton_checks()))
