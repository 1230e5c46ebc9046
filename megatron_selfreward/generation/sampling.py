"""Next-token sampling for the in-process engine: temperature, top-k, top-p, by inverse CDF.

One uniform per row and step (drawn by the engine from the sample's own generator), so a sample
depends only on its seed, never on the batch it ran in. Top-k / top-p look at the head of each
row's distribution first (a full sort of a 49k vocabulary costs more than a decode step's
attention on a CPU) and widen only for the rows where the head was not exact.
"""

from __future__ import annotations

import math

import torch

# Top-k / top-p look at this many largest logits first, then the next width for rows where that
# was not exact, a full sort last. topk's cost grows with k; SmolLM2 at T=0.7, top-p 0.9 (the
# paper's settings): median nucleus 2-3 tokens, over 64 in under 1% of rows, never over 256.
SAMPLING_HEAD_WIDTHS = (64, 512)


def _sample_plain(scaled: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(scaled), one uniform per row."""
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    # right=True never lands on a zero-probability token (the CDF is flat there); the clamp
    # guards the u -> 1 rounding edge.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(cdf.shape[-1] - 1)


def _sample_head(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 uniform: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k / top-p sampling over the `width` largest logits of each row.

    Returns the tokens and, per row, whether that was exact: the top-k set lies in the head, or
    (top-k off) the nucleus closes inside it. A full sort of a 49k vocabulary costs more than a
    decode step's attention on a CPU; the head of a trained model's distribution rarely does.
    """
    vocab = scaled.shape[-1]
    head, order = scaled.topk(width, dim=-1)  # sorted, largest first
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    head = head.masked_fill(torch.arange(width, device=head.device) >= k[:, None], -math.inf)
    # Normalise over the top-k set (inside the head when k <= width), else over everything.
    log_norm = torch.where(k <= width, torch.logsumexp(head, dim=-1), torch.logsumexp(scaled, dim=-1))
    probs = (head - log_norm[:, None]).exp()
    cum = probs.cumsum(dim=-1)
    # Keep the smallest head whose mass reaches top_p; top_p = 1 must keep everything even
    # when the fp32 cumulative sum overshoots 1.
    threshold = torch.where(top_p >= 1.0, torch.full_like(top_p, math.inf), top_p)
    probs = probs.masked_fill(cum - probs >= threshold[:, None], 0.0)
    covered = (k <= width) | ((k == vocab) & (cum[:, -1] >= threshold)) | (width == vocab)
    cdf = probs.cumsum(dim=-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    last = (probs > 0).sum(dim=-1) - 1
    pick = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(last)
    return order.gather(1, pick[:, None]).squeeze(1), covered


def _rows_where(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Row indices where `mask` holds and those rows of each tensor (no copy when all rows do)."""
    if bool(mask.all()):
        return torch.arange(len(mask), device=mask.device), list(tensors)
    idx = mask.nonzero().squeeze(1)
    return idx, [t[idx] for t in tensors]


def _sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row (all rows have temperature > 0): temperature, top-k, then top-p."""
    scaled = logits / temperature[:, None]
    tokens = torch.empty(len(scaled), dtype=torch.long, device=scaled.device)
    plain = (top_k == 0) & (top_p >= 1.0)
    if bool(plain.any()):
        idx, (rows, u) = _rows_where(plain, scaled, uniform)
        tokens[idx] = _sample_plain(rows, u)
    if bool(plain.all()):
        return tokens
    vocab = scaled.shape[-1]
    idx, (rows, k, p, u) = _rows_where(~plain, scaled, top_k, top_p, uniform)
    for width in [w for w in SAMPLING_HEAD_WIDTHS if w < vocab] + [vocab]:
        head_tokens, covered = _sample_head(rows, k, p, u, width)
        tokens[idx] = head_tokens  # rows not covered are resampled wider
        if bool(covered.all()):
            break
        keep = ~covered
        idx, rows, k, p, u = idx[keep], rows[keep], k[keep], p[keep], u[keep]
    return tokens


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, uniform: torch.Tensor,
                  allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-probability under the unmodified distribution.

    logits [rows, vocab] fp32; temperature 0 = greedy (argmax); top_k 0 = off; top_p 1 = off;
    uniform [rows] in [0, 1): the row's random number for this step; allowed [rows, vocab] bool
    (optional): the only tokens a row may draw.
    """
    raw = logits
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    sampled = temperature > 0
    if bool(sampled.all()):  # skip the argmax pass over the vocabulary
        tokens = _sample_rows(logits, temperature, top_k, top_p, uniform)
    else:
        tokens = logits.argmax(dim=-1)
        if bool(sampled.any()):
            idx, rows = _rows_where(sampled, logits, temperature, top_k, top_p, uniform)
            tokens[idx] = _sample_rows(*rows)
    logprobs = raw.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
    return tokens, logprobs
