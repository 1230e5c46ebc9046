"""The megatron-core internals this package relies on, one function per capability.

Everything else uses megatron.core's public API. What is here has no public equivalent; each
function names the upstream classes and functions it depends on, as of the releases in
`compat.SUPPORTED` (read in megatron-core 0.16.1, 0.17.1, 0.18.2 and 0.19.2).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["streaming_save_strategy"]


def streaming_save_strategy(
    resolve: Callable[[str, tuple], torch.Tensor],
    on_failure: Callable[[BaseException], BaseException],
) -> Any:
    """A `sharded_strategy` for `dist_checkpointing.save` that writes the torch_dist format but
    asks `resolve(checkpoint key, global offset)` for each tensor only when torch DCP's writer
    writes it, so that the state dict passed to `save` may hold meta tensors (layout only) and
    a conversion never holds more than a few tensors.

    torch DCP reports a failure as `CheckpointException` (a BaseException); `on_failure(error)`
    returns what to raise instead.

    Upstream, in megatron.core.dist_checkpointing:
    - `strategies.torch.TorchDistSaveShardedStrategy`: subclassed, `save()` replaced.
      `serialization.save` calls `sharded_strategy.save(sharded_state_dict, checkpoint_dir)`
      and writes metadata.json from its `backend`/`version`. Since 0.17 it replaces any
      strategy that is not a TorchDistSaveShardedStrategy, without a word (0.19 removed
      `strategies.base.SaveShardedStrategy`, which this subclassed before).
    - `strategies.torch._replace_state_dict_keys_with_sharded_keys` (private): groups the
      main-replica shards by checkpoint key, as TorchDistSaveShardedStrategy does before saving.
    - `strategies.torch.mcore_to_pyt_state_dict`: megatron shards -> torch sharded tensors and
      BytesIO objects (ShardedObjects; since 0.19 also the common state, "common_state").
    - `strategies.torch.MCoreSavePlanner`: subclassed, `resolve_data()` produces the tensor.
    The same code serves every supported release; torch's FileSystemWriter with one file per
    tensor (megatron's writer keeps a whole file's tensors alive until the file is closed).
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            tensor = resolve(write_item.index.fqn, tuple(write_item.index.offset))
            return tensor.reshape(write_item.tensor_data.chunk.sizes)

    class StreamingSave(TorchDistSaveShardedStrategy):
        def __init__(self) -> None:
            super().__init__("torch_dist", 1)  # the format megatron's default loader reads

        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, keep_only_main_replica=True)
            writer = dcp.FileSystemWriter(checkpoint_dir, single_file_per_rank=False,
                                          thread_count=1, sync_files=True)
            planner = LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
            try:
                dcp.save(mcore_to_pyt_state_dict(grouped, False), storage_writer=writer, planner=planner)
            except CheckpointException as err:
                raise on_failure(err) from None

        def async_save(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the streaming save is synchronous")

    return StreamingSave()
