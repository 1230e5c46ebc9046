"""Fake CUDA on a CPU-only torch: run our training and generation code on tensors that say `cuda`.

Under torch's FakeTensorMode every tensor is metadata only (shape, dtype, device), so a model
"on cuda" costs no memory and an op that mixes a `cuda` tensor with a CPU one raises
`FakeTensorDeviceMismatchError`, as it would on a GPU. Three things make megatron-core run there
(measured, see platform-notes.md, "Testing device and multi-node behaviour"):

- c10's `FakeGuardImpl<CUDA>` registered as CUDA's device guard (fake_cuda_guard.cpp, built once
  per torch version into the extension cache, named like the project's kernels: kernels/build.py);
  without it every op that takes a device guard (copy_, contiguous) fails;
- parameters created with "cuda" as the default device and `torch.cuda.current_device()`
  answering `cuda:0` (megatron creates buffers there); cpu_compat's RNG and stream stand-ins stay,
  its cuda->cpu redirect is switched off;
- megatron's RNG tracker `fork()` compares RNG states with `.item()`, which fake tensors refuse:
  it becomes a no-op (dropout masks are not what these tests check).

torch.distributed's *object* collectives (all_gather_object and the like: pickled Python objects,
which the process group carries as byte tensors of its own making) run outside the mode: the
checkpoint code exchanges metadata with them, and fake byte tensors cannot be unpickled. So does
megatron's check of a checkpoint's sharding (`validation.validate_sharding_integrity`, which
counts shard accesses in host tensors of its own).

A ShapeEnv lets data-dependent shapes through (the loss path selects the masked positions with
`nonzero`). `backward()` does not run under the mode (the autograd engine asks for a real
accelerator), so gradient and optimizer placement is checked on their buffers instead.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

SOURCE = Path(__file__).with_name("fake_cuda_guard.cpp")


@functools.cache
def load_guard() -> None:
    """Build (first time for this torch) and load the fake CUDA device guard."""
    from torch.utils.cpp_extension import load

    from megatron_selfreward.kernels.build import extension_name, ninja_on_path

    ninja_on_path()
    name = extension_name("selfreward_fake_cuda_guard", SOURCE.read_bytes(), torch.__version__.encode())
    load(name, sources=[str(SOURCE)], is_python_module=False, verbose=False)


class FakeCuda:
    """The active fake-CUDA session: `build` creates modules with their parameters on `cuda`."""

    device = torch.device("cuda", 0)

    def __init__(self, mode: Any) -> None:
        self.mode = mode

    def build(self, make: Callable[[], Any]) -> Any:
        torch.set_default_device("cuda")
        try:
            return make()
        finally:
            # Everything else runs as in production: data code builds host tensors.
            torch.set_default_device(None)


_OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list",
                       "scatter_object_list")


@contextlib.contextmanager
def _host_bookkeeping_outside_the_mode() -> Iterator[None]:
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def outside(func: Callable) -> Callable:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return call

    from megatron.core.dist_checkpointing import validation

    targets = [(dist, name) for name in _OBJECT_COLLECTIVES]
    targets.append((validation, "validate_sharding_integrity"))
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    try:
        for owner, name, func in saved:
            setattr(owner, name, outside(func))
        yield
    finally:
        for owner, name, func in saved:
            setattr(owner, name, func)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """Fake CUDA for the duration; call inside megatron's parallel state (single_process_world)."""
    from megatron.core.tensor_parallel import random as mrandom
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from megatron_selfreward.megatron import cpu_compat

    if torch.cuda.is_available():
        pytest.skip("a real CUDA device is present: the GPU tests cover this machine")
    load_guard()
    cpu_compat.apply()
    tracker = mrandom.get_cuda_rng_tracker()
    saved = (cpu_compat.redirect_cuda_to_cpu, torch.cuda.current_device, tracker.__dict__.get("fork"))
    cpu_compat.redirect_cuda_to_cpu = False
    torch.cuda.current_device = lambda: FakeCuda.device  # a bare index fails: no accelerator
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        with _host_bookkeeping_outside_the_mode(), \
                FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()) as mode:
            yield FakeCuda(mode)
    finally:
        cpu_compat.redirect_cuda_to_cpu, torch.cuda.current_device = saved[0], saved[1]
        if saved[2] is None:
            del tracker.fork
        else:
            tracker.fork = saved[2]


def host_reads(monkeypatch: Any, token: int = 0, answer: bool = True) -> None:
    """Answers for reads of a fake tensor's values into Python, which it does not have: code on a
    GPU reads them with a device sync. `tolist()` (the engine's sampled tokens and log-probs, once
    per decode step) gives `token` per row (0.0 if floating point); `bool()` (the sampler's
    branches: any row sampled, any with top-k/top-p) gives `answer` (True takes the sampling
    branches, False the greedy ones); `float()` and `item()` (a fed Followup token's log-prob,
    megatron's reading of Adam's step count) give 0."""
    from torch._subclasses.fake_tensor import FakeTensor

    real = {name: getattr(torch.Tensor, name) for name in ("__bool__", "__float__", "item")}

    def answering(name: str, value: Callable[[torch.Tensor], Any]) -> Callable:
        def read(self: torch.Tensor) -> Any:
            return value(self) if isinstance(self, FakeTensor) else real[name](self)
        return read

    monkeypatch.setattr(FakeTensor, "tolist",
                        lambda self: [0.0 if self.is_floating_point() else token] * int(self.shape[0]))
    monkeypatch.setattr(torch.Tensor, "__bool__", answering("__bool__", lambda t: answer))
    monkeypatch.setattr(torch.Tensor, "__float__", answering("__float__", lambda t: 0.0))
    monkeypatch.setattr(torch.Tensor, "item", answering(
        "item", lambda t: 0.0 if t.is_floating_point() else 0))


def devices(tree: Any) -> set[torch.device]:
    """Devices of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return {tree.device}
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return set().union(*(devices(item) for item in tree)) if tree else set()
    return set()
