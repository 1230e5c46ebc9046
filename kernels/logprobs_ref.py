"""The reference for kernels/logprobs.py: per-token log-probabilities the obvious way.

Materialises the full [T, V] logits (in fp32), so it is the ground truth the chunked kernels
are tested against, not something to run at Llama scale.
"""

from __future__ import annotations

import torch


def logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[t, targets[t]] for hidden [..., H], weight [V, H], targets [...]."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
