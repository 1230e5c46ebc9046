"""Which samples each optimizer step sees: a deterministic, resumable stream of global batches.

The stream is the concatenation of one seeded permutation per epoch (epoch e uses seed + e), cut
into global batches of `global_batch_size` sample indices. Its whole position is one integer,
`consumed_samples`, saved in every checkpoint: restoring it replays the same batches exactly.
A global batch may straddle two epochs, so every step has exactly `global_batch_size` samples
(each layout then divides it the same way) and no sample is dropped.
"""

from __future__ import annotations

import torch


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_samples, generator=gen).tolist()


def total_steps_for(num_samples: int, global_batch_size: int, epochs: int, max_steps: int) -> int:
    """Optimizer steps in a run: `max_steps` if set, else whole global batches in `epochs` epochs."""
    if max_steps > 0:
        return max_steps
    return max(1, (num_samples * epochs) // global_batch_size)


class GlobalBatchSampler:
    """Yields lists of `global_batch_size` sample indices; `consumed_samples` is its position."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, consumed_samples: int = 0):
        if num_samples <= 0:
            raise ValueError("no training samples (after dropping over-long ones): nothing to train on")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self._cache: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            self._cache = {epoch: epoch_order(self.num_samples, self.seed, epoch)}
        return self._cache[epoch]

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def next_batch(self) -> list[int]:
        out = []
        for _ in range(self.global_batch_size):
            epoch, offset = divmod(self.consumed_samples, self.num_samples)
            out.append(self._order(epoch)[offset])
            self.consumed_samples += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_samples", "global_batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint's data has {key}={state[key]}, this run has "
                    f"{getattr(self, key)} (a different data set or config); use a new output dir"
                )
        self.consumed_samples = int(state["consumed_samples"])
