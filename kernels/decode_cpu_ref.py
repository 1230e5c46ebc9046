"""Plain-torch references for decode_cpu.cpp: what each op must compute (fp32 inside)."""

from __future__ import annotations

import torch


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + swap_halves(x) * sin on the first rot dims (sin signed as [-sin, sin])."""
    rot = cos.shape[-1]
    head, tail = x[..., :rot], x[..., rot:]
    swapped = torch.cat((head[..., rot // 2:], head[..., : rot // 2]), dim=-1)
    return torch.cat((head * cos + swapped * sin, tail), dim=-1)


def decode_attention_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                         prefix_keys: torch.Tensor | None, prefix_values: torch.Tensor | None,
                         prefix_len: int, start: int, scale: float) -> torch.Tensor:
    """One query token per row through one layer's attention, writing the cache in place.

    qkv [rows, groups, heads_per_group + 2, dim]: per KV group its query heads, then the key
    and the value (Megatron's fused layout); cos, sin fp32 [rows, rot] (sin signed as
    [-sin, sin]); keys/values [rows, groups, max_len, dim]: the row caches, whose column
    `start` receives the rotated key and the value; valid bool [rows, max_len]; prefix
    keys/values [1, groups, >= prefix_len, dim]: columns every row attends before its own,
    which start at prefix_len. Attended: the whole prefix, the row's valid columns in
    [prefix_len, start), and column `start`. Returns [rows, groups * heads_per_group * dim]
    in qkv's dtype, head h of group g at (g * heads_per_group + h) * dim.
    """
    rows, groups, width, dim = qkv.shape
    per_group = width - 2
    x = qkv.float()
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    query = _rope(x[:, :, :per_group], c, s) * scale
    keys[:, :, start] = _rope(x[:, :, per_group:per_group + 1], c, s)[:, :, 0].to(keys.dtype)
    values[:, :, start] = qkv[:, :, per_group + 1]
    k = keys[:, :, prefix_len:start + 1].float()
    v = values[:, :, prefix_len:start + 1].float()
    mask = valid[:, prefix_len:start + 1].clone()
    mask[:, -1] = True
    if prefix_len:
        assert prefix_keys is not None and prefix_values is not None
        shared = (rows, groups, prefix_len, dim)
        k = torch.cat((prefix_keys[:, :, :prefix_len].float().expand(shared), k), dim=2)
        v = torch.cat((prefix_values[:, :, :prefix_len].float().expand(shared), v), dim=2)
        mask = torch.cat((mask.new_ones(rows, prefix_len), mask), dim=1)
    # Columns not attended may hold anything (an unwritten cache column: NaN); 0 * NaN is NaN.
    k = k.masked_fill(~mask[:, None, :, None], 0.0)
    v = v.masked_fill(~mask[:, None, :, None], 0.0)
    scores = torch.einsum("bghd,bgcd->bghc", query, k)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bghc,bgcd->bghd", scores.softmax(dim=-1), v)
    return out.reshape(rows, groups * per_group * dim).to(qkv.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in fp32, rounded once."""
    v = x.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
