"""Training FLOPs per token and model FLOPs utilisation (MFU) for the Llama family.

The count follows Megatron-LM's `num_floating_point_operations` (megatron/training/training.py,
dense-model branch), which expands the Narayanan et al. 2021 appendix formula:

    flops/token = 12 * L * h^2 * [ (1 + g/a + s/h * c) * (a*d/h)     attention: Q,O + K,V + core
                                 + (f/h) * 3/2                      SwiGLU MLP: 3 matrices h x f
                                 + V / (2 * L * h) ]                logits layer

with L layers, hidden h, a heads of size d, g KV groups, FFN width f, sequence s, vocabulary V,
and c = 1 for the unhalved count, 1/2 when only the causal (lower) half of the score and context
matrices is counted. The factor 12 = 3 (forward, data-grad, weight-grad GEMMs) x 2 (FLOPs per
multiply-add) x 2 (the formula groups GEMMs in pairs). Equivalently 6 N + 12 L s h c, with
N = the GEMM parameters (attention + MLP + output layer; embedding lookups and norms do no GEMM).

Megatron-LM has shipped both conventions (c = 1 in older releases, c = 1/2 since the causal fix),
so `causal_halved` is an explicit argument and every reported MFU should state which was used.
Elementwise work (norms, softmax, RoPE, SiLU) and full recomputation's extra forward are not
counted: MFU is "model" FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_selfreward.config import Config

# Dense (no 2:4 sparsity) BF16 tensor-core peaks from the vendor datasheets, FLOP/s per device.
# H200 has H100 SXM's compute with more/faster memory, hence the same figure. The CPU has no
# datasheet figure: measure it on the machine (`measure_matmul_flops`) and pass it in.
PEAK_BF16_FLOPS: dict[str, float | None] = {
    "h100-sxm": 989e12,
    "h100-pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "cpu": None,
}

# torch.cuda.get_device_name() spellings -> PEAK_BF16_FLOPS keys, first match wins (so the
# more specific names come first: "H100 PCIe" before the SXM default for "H100").
_DEVICE_NAME_KEYS = (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100-sxm"),
                     ("a100", "a100"), ("l40s", "l40s"))


@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers the FLOP count depends on."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    kv_channels: int = 0  # 0 = hidden_size // num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, cfg: Config) -> LlamaShape:
        m = cfg.model
        return cls(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                   m.num_query_groups, m.vocab_size)


def training_flops_per_token(shape: LlamaShape, seq_len: int, *, causal_halved: bool) -> float:
    """Forward + backward FLOPs for one token of a `seq_len`-token training sequence."""
    L, h, f = shape.num_layers, shape.hidden_size, shape.ffn_hidden_size
    a, g = shape.num_attention_heads, shape.num_query_groups
    query_to_hidden = shape.head_dim * a / h
    core_attention = seq_len / h * (0.5 if causal_halved else 1.0)
    attention = (1 + g / a + core_attention) * query_to_hidden
    swiglu_mlp = f / h * 1.5
    logits = shape.vocab_size / (2 * L * h)
    return 12.0 * L * h * h * (attention + swiglu_mlp + logits)


def config_flops_per_token(cfg: Config, *, causal_halved: bool, seq_len: int | None = None) -> float:
    """`training_flops_per_token` for a run config (sequence: `sft.seq_len` unless given)."""
    return training_flops_per_token(LlamaShape.from_config(cfg), seq_len or cfg.sft.seq_len,
                                    causal_halved=causal_halved)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of the devices used.

    `tokens_per_s` and `peak_flops` must cover the same devices (e.g. the whole job's tokens/s
    and num_gpus x the per-GPU peak).
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


def peak_flops(device: str) -> float:
    """The per-device dense BF16 peak for a name in PEAK_BF16_FLOPS."""
    key = device.lower()
    if key not in PEAK_BF16_FLOPS:
        raise KeyError(f"no peak FLOPS for {device!r}; known: {sorted(PEAK_BF16_FLOPS)}")
    value = PEAK_BF16_FLOPS[key]
    if value is None:
        raise ValueError(f"{device!r} has no datasheet peak: measure it with measure_matmul_flops()")
    return value


def peak_key_for_device_name(name: str) -> str | None:
    """The PEAK_BF16_FLOPS key of a CUDA device name ("NVIDIA H200" -> "h200"); None if unknown."""
    lowered = name.lower()
    return next((key for needle, key in _DEVICE_NAME_KEYS if needle in lowered), None)


def measure_matmul_flops(n: int = 512, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul here: the CPU 'peak' an MFU figure divides by.

    Best-of rather than mean because other processes share the cores; the GEMM roofline is the
    fair denominator.
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: first call pays for thread-pool start-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best
