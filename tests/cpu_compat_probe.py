"""Probe each CUDA call megatron-core makes on our CPU path, with or without cpu_compat.

Run as `python tests/cpu_compat_probe.py raw|patched|patched_without_type_remap`; prints one JSON object
{probe_name: "ok" | "error: ..."}. Used by tests/unit/test_cpu_compat.py in a fresh process, so
the unpatched run really is unpatched.
"""

from __future__ import annotations

import json
import sys
import warnings


def _world() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def probes() -> dict:
    import torch

    def rng_tracker():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(1)

    def causal_mask():
        from megatron.core.transformer.utils import get_default_causal_mask

        assert get_default_causal_mask(4).device.type == "cpu"

    def distributed_optimizer_type_check():
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from megatron_selfreward.config import load_config
        from megatron_selfreward.megatron.model import build_model

        cfg = load_config(None)
        model = build_model(cfg)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=True), model)
        get_megatron_optimizer(OptimizerConfig(lr=1e-3, use_distributed_optimizer=True), [ddp])

    return {
        "current_device": lambda: torch.empty(2, device=torch.cuda.current_device()),
        "literal_cuda_device": lambda: torch.zeros(1, device="cuda"),
        "tensor_cuda_method": lambda: torch.ones(2).cuda(),
        "pin_memory": lambda: torch.zeros(2, pin_memory=True),
        "synchronize": lambda: torch.cuda.synchronize(),
        "streams": lambda: torch.cuda.current_stream().wait_stream(torch.cuda.Stream()),
        "events": lambda: torch.cuda.Event(enable_timing=True).record(),
        "nvtx": lambda: torch.cuda.nvtx.range_push("probe"),
        "cuda_rng_state": lambda: torch.cuda.get_rng_state(),
        "rng_tracker": rng_tracker,
        "causal_mask": causal_mask,
        "distributed_optimizer_type_check": distributed_optimizer_type_check,
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    mode = sys.argv[1]
    if mode in ("patched", "patched_without_type_remap"):
        from megatron_selfreward.megatron import cpu_compat

        assert cpu_compat.apply()
        cpu_compat.remap_tensor_type = mode == "patched"
    _world()
    results = {}
    for name, probe in probes().items():
        try:
            probe()
            results[name] = "ok"
        except Exception as err:  # noqa: BLE001 - the probe reports every failure kind
            results[name] = f"error: {type(err).__name__}: {str(err)[:200]}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
