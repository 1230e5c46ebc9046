"""Per-token log-probabilities of target tokens without materialising the [T, V] logits.

DPO needs log p(y_t | y_<t) for every response token under the policy and the reference model.
The obvious way (logits = h @ W.T, log_softmax, gather; kernels/logprobs_ref.py) holds a [T, V]
fp32 tensor: 4096 tokens x 32000 vocab = 0.5 GB per sequence, twice over with its gradient. Here
the vocabulary is walked in chunks:

  forward   an online log-sum-exp over V chunks (running max m and scaled sum s) plus the target's
            logit; saves only lse [T].
  backward  d logp_t / d logit_tv = 1[v = y_t] - softmax_tv: each chunk's logits are recomputed
            from h and W, turned into dlogits, and folded into dh = dlogits @ W and
            dW = dlogits.T @ h at once.

Two implementations with that memory property:
  * `triton_logprobs` - Triton kernels (one program per block of tokens for the forward and dh,
    one per block of vocabulary rows for dW, so every output row has one writer: no atomics,
    deterministic). Runs on CUDA, and on CPU under Triton's interpreter (TRITON_INTERPRET=1 set
    before triton is imported), which is how it is tested here.
  * `chunked_logprobs_torch` - the same algorithm in plain torch ([T, chunk] at a time), for CPU
    training and anywhere Triton is absent.

Both take the full vocabulary (TP=1, or the output weight gathered); a vocab-parallel version
would all-reduce m/s over the TP group as megatron's vocab_parallel_cross_entropy does.
Targets must lie in [0, V): mask padded positions by zeroing their output's gradient.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without the test extra: the torch path still works
    triton = None
    tl = None


# ---------------------------------------------------------------------------------------------
# Plain torch, chunked over the vocabulary


def _chunk_dlogits(logits: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """-g * softmax for one chunk; the +g one-hot term is added once, outside the chunk loop."""
    return -(grad[:, None] * torch.exp(logits - lse[:, None]))


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        # Logits in fp32 as the Triton kernel's accumulators are (a bf16 [T, chunk] GEMM output
        # would round every logit to ~3 significant digits).
        h32 = hidden.float()
        lse = torch.full(hidden.shape[:1], float("-inf"), dtype=torch.float32, device=hidden.device)
        for v0 in range(0, weight.shape[0], chunk):
            logits = h32 @ weight[v0:v0 + chunk].float().T
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        # The target's logit is one row of W per token: O(T*H), no [T, V] needed.
        target_logit = (h32 * weight[targets].float()).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return target_logit - lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        hidden, weight, targets, lse = ctx.saved_tensors
        grad = grad_out.float()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        h32 = hidden.float()
        for v0 in range(0, weight.shape[0], ctx.chunk):
            w_chunk = weight[v0:v0 + ctx.chunk].float()
            dlogits = _chunk_dlogits(h32 @ w_chunk.T, lse, grad)
            if want_h:
                dh += dlogits @ w_chunk
            if want_w:
                dw[v0:v0 + ctx.chunk] += dlogits.T @ h32
        if want_h:
            dh += grad[:, None] * weight[targets].float()
        if want_w:
            dw.index_add_(0, targets, grad[:, None] * h32)
        return (dh.to(hidden.dtype) if want_h else None,
                dw.to(weight.dtype) if want_w else None, None, None)


def chunked_logprobs_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk: int = 4096) -> torch.Tensor:
    """Per-token log-probs [...] (fp32) from hidden [..., H] and weight [V, H], `chunk` rows of V at a time."""
    lead = hidden.shape[:-1]
    out = _ChunkedLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                 targets.reshape(-1).long(), chunk)
    return out.reshape(lead)


# ---------------------------------------------------------------------------------------------
# Triton

if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr):
        """acc + a @ b; "upcast" = fp32 products, for 16-bit inputs under the interpreter."""
        if PRECISION == "upcast":
            # The interpreter multiplies bf16 tiles as raw integers (wrong by ~1e10), so 16-bit
            # inputs are widened first; on a GPU the tensor cores take them as they are.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _chunk_logits(h_ptr, w_ptr, rows, cols, T, V, H, stride_h, stride_w,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      PRECISION: tl.constexpr):
        """[BLOCK_T, BLOCK_V] fp32 logits h[rows] @ W[cols].T; out-of-range entries read as 0."""
        acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                        mask=(rows[:, None] < T) & (ks[None, :] < H), other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                        mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)
            acc = _dot(h, tl.trans(w), acc, PRECISION)
        return acc

    @triton.jit
    def _dlogits(logits, cols, tgt, lse, g, V):
        """g * (onehot(target) - softmax), zero in the padding columns past V."""
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        d = g[:, None] * (onehot - tl.exp(logits - lse[:, None]))
        return tl.where(cols[None, :] < V, d, 0.0)

    @triton.jit
    def _forward_kernel(h_ptr, w_ptr, tgt_ptr, logp_ptr, lse_ptr, T, V, H, stride_h, stride_w,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        target_logit = tl.zeros([BLOCK_T], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            logits = _chunk_logits(h_ptr, w_ptr, rows, cols, T, V, H, stride_h, stride_w,
                                   BLOCK_T, BLOCK_V, BLOCK_H, PRECISION)
            logits = tl.where(cols[None, :] < V, logits, float("-inf"))
            # Every chunk has a column < V, so m_new is finite and exp(-inf - m_new) = 0.
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m = m_new
            target_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
        lse = m + tl.log(s)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(logp_ptr + rows, target_logit - lse, mask=row_ok)

    @triton.jit
    def _grad_hidden_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, dh_ptr, T, V, H,
                            stride_h, stride_w, stride_dh,
                            BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                            PRECISION: tl.constexpr):
        """dh[rows] = sum over V chunks of dlogits @ W[chunk]; this program owns rows, so no atomics."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            logits = _chunk_logits(h_ptr, w_ptr, rows, cols, T, V, H, stride_h, stride_w,
                                   BLOCK_T, BLOCK_V, BLOCK_H, PRECISION)
            d = _dlogits(logits, cols, tgt, lse, g, V)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                            mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)
                out = dh_ptr + rows[:, None] * stride_dh + ks[None, :]
                out_mask = row_ok[:, None] & (ks[None, :] < H)
                acc = tl.load(out, mask=out_mask, other=0.0)
                acc = _dot(d.to(w.dtype), w, acc, PRECISION)
                tl.store(out, acc, mask=out_mask)

    @triton.jit
    def _grad_weight_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, dw_ptr, T, V, H,
                            stride_h, stride_w, stride_dw,
                            BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                            PRECISION: tl.constexpr):
        """dW[cols] = sum over token blocks of dlogits.T @ h[block]; this program owns cols."""
        cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
            logits = _chunk_logits(h_ptr, w_ptr, rows, cols, T, V, H, stride_h, stride_w,
                                   BLOCK_T, BLOCK_V, BLOCK_H, PRECISION)
            d = _dlogits(logits, cols, tgt, lse, g, V)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                            mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
                out = dw_ptr + cols[:, None] * stride_dw + ks[None, :]
                out_mask = col_ok[:, None] & (ks[None, :] < H)
                acc = tl.load(out, mask=out_mask, other=0.0)
                acc = _dot(tl.trans(d).to(h.dtype), h, acc, PRECISION)
                tl.store(out, acc, mask=out_mask)


DEFAULT_BLOCKS = (64, 128, 64)  # (BLOCK_T, BLOCK_V, BLOCK_H): untuned; tl.dot wants each >= 16


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products (TF32 would cost ~1e-3 relative error); 16-bit on a GPU:
    # the setting is ignored; 16-bit under the interpreter: see _dot.
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32"


class TritonLogprobs(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; inputs are 2-D contiguous, targets int64 [T]."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                blocks: tuple[int, int, int]) -> torch.Tensor:
        (T, H), V = hidden.shape, weight.shape[0]
        block_t, block_v, block_h = blocks
        logp = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(T, dtype=torch.float32, device=hidden.device)
        _forward_kernel[(triton.cdiv(T, block_t),)](
            hidden, weight, targets, logp, lse, T, V, H, hidden.stride(0), weight.stride(0),
            BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h, PRECISION=_precision(hidden.dtype))
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.blocks = blocks
        return logp

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        hidden, weight, targets, lse = ctx.saved_tensors
        (T, H), V = hidden.shape, weight.shape[0]
        block_t, block_v, block_h = ctx.blocks
        grad = grad_out.float().contiguous()
        meta = dict(BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h,
                    PRECISION=_precision(hidden.dtype))
        dh = dw = None
        if ctx.needs_input_grad[0]:
            # fp32 accumulators, read-modify-written once per V chunk, cast at the end.
            dh = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
            _grad_hidden_kernel[(triton.cdiv(T, block_t),)](
                hidden, weight, targets, lse, grad, dh, T, V, H,
                hidden.stride(0), weight.stride(0), dh.stride(0), **meta)
            dh = dh.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros(V, H, dtype=torch.float32, device=weight.device)
            _grad_weight_kernel[(triton.cdiv(V, block_v),)](
                hidden, weight, targets, lse, grad, dw, T, V, H,
                hidden.stride(0), weight.stride(0), dw.stride(0), **meta)
            dw = dw.to(weight.dtype)
        return dh, dw, None, None


def triton_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    blocks: tuple[int, int, int] = DEFAULT_BLOCKS) -> torch.Tensor:
    """Per-token log-probs [...] (fp32) from hidden [..., H] and weight [V, H] via Triton."""
    if triton is None:
        raise RuntimeError("triton is not installed: use chunked_logprobs_torch (or impl='torch')")
    lead = hidden.shape[:-1]
    out = TritonLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]).contiguous(),
                               weight.contiguous(), targets.reshape(-1).long().contiguous(), blocks)
    return out.reshape(lead)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors only under its interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
             impl: str = "auto", chunk: int = 4096) -> torch.Tensor:
    """Per-token log-probs; impl: auto (Triton where usable, else torch chunks) | triton | torch | reference."""
    if impl == "auto":
        impl = "triton" if triton_usable(hidden.device) else "torch"
    if impl == "triton":
        return triton_logprobs(hidden, weight, targets)
    if impl == "torch":
        return chunked_logprobs_torch(hidden, weight, targets, chunk)
    if impl == "reference":
        from megatron_selfreward.kernels.logprobs_ref import logprobs_reference

        return logprobs_reference(hidden, weight, targets)
    raise ValueError(f"impl must be auto, triton, torch or reference, got {impl!r}")
