"""Run Megatron-Core on a machine without CUDA (gloo backend, CPU tensors).

Megatron-Core hard-codes CUDA in a few dozen places on the training, checkpoint and inference
paths. Everything needed to run those paths on CPU lives here, applied once per process by
`apply()` and only when CUDA is absent. Each redirect carries a one-line reason. The tests in
`tests/unit/test_cpu_compat.py` list the megatron-core call sites each redirect exists for, so a
megatron-core upgrade that changes what is needed fails there first, loudly.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
CPU = torch.device("cpu")
# Tests switch this off to show the `.type()` remap is still needed by megatron's optimizers.
remap_tensor_type = True
# Fake-CUDA tests (tests/fake_cuda.py) switch this off: their tensors must stay on `cuda`, so that
# a tensor left on the CPU meets a cuda one and fails as it would on a GPU.
redirect_cuda_to_cpu = True


class _NoopStream:
    """Stands in for torch.cuda.Stream: DDP grad sync and p2p only order work on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NoopEvent":
        return event or _NoopEvent()


class _NoopEvent:
    """Stands in for torch.cuda.Event: timers and stream ordering are no-ops on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return False


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA placement requested inside torch calls onto the CPU.

    Covers what attribute patches cannot: literal `device="cuda"` arguments (pipeline schedules,
    optimizers, grad clipping, checkpoint exchange), `tensor.cuda()` calls, `pin_memory=True`, and
    optimizer code that compares `param.type()` with `'torch.cuda.FloatTensor'`.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not redirect_cuda_to_cpu:
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            # `.cuda()` means "the accelerator": on CPU the tensor is already where it belongs.
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and remap_tensor_type:
            name = func(*args)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            # Only megatron's optimizer/clip-grad type checks see the CUDA name; our code never does.
            if caller.startswith("megatron.core"):
                return _CUDA_TYPE_NAMES.get(name, name)
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=CPU)
        if kwargs.get("pin_memory"):
            # Pinned host memory needs a CUDA driver; plain host memory is the CPU equivalent.
            kwargs = dict(kwargs, pin_memory=False)
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], CPU, *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_get(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # Parameters, buffers and RoPE frequencies are created on `current_device()`: make that the CPU.
    cuda.current_device = lambda: CPU
    # DDP grad sync, p2p and timers synchronise streams; there is one implicit CPU "stream".
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NoopStream
    cuda.Event = _NoopEvent
    cuda.current_stream = lambda *a, **k: _NoopStream()
    cuda.default_stream = lambda *a, **k: _NoopStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    # NVTX ranges are profiler annotations; the CPU build has no NVTX library behind them.
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.mark = lambda *a, **k: None
    # Megatron's "CUDA" RNG (dropout in TP regions) is the CPU generator here.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.)
    cuda.manual_seed = _seed_cpu_generator
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # The tracker forks "CUDA" RNG states by reading torch.cuda.default_generators directly.
    mrandom._get_cuda_rng_state = _cpu_rng_get
    mrandom._set_cuda_rng_state = _cpu_rng_set


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Install the CPU redirects once per process; returns True when they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not cuda_absent():
        return False
    _patch_torch_cuda()
    _patch_megatron()
    CudaToCpuMode().__enter__()  # pushed for the life of the process, on this (main) thread
    _APPLIED = True
    return True
