"""The in-process generation engine: batched KV-cache decoding on a Megatron-Core GPTModel.

Used for response sampling, judging and prompt generation on the everyday CPU path (and as the
fallback on GPUs without TensorRT-LLM). It runs this rank's shard of the model (so tensor
parallelism is Megatron's own weight layout) with its own attention over its own KV cache:

- Plain Llama layers (the local spec) run on their weight tensors directly (GEMMs, rms_norm,
  SDPA, an all-reduce after row-parallel GEMMs): Megatron's per-call wrappers cost about as much
  as the GEMMs at decode batch sizes on a CPU. Other layers (the TE spec on GPUs) run through
  their Megatron modules. `dtype="bfloat16"` runs an fp32 model as a bf16 copy (AMX CPUs).
  On CPUs the direct path's decode GEMMs take oneDNN-packed weights with the residual add and
  SwiGLU fused in (packed_linear.py), and its ops bypass torch-function modes (the CPU compat
  redirect costs microseconds per op, a few thousand ops per step). TP > 1 keeps the packed
  GEMMs; the residual add then follows the all-reduce instead of being fused.
- Why not megatron's StaticInferenceContext: it stores keys *before* RoPE and re-rotates the
  whole cache every step, takes RoPE positions from the column index (one offset for the whole
  batch, so left padding shifts a row's positions and a shared prefix cannot be followed by
  padded suffixes) and repeats KV heads for GQA each step. Our cache stores rotated keys, takes
  per-row position ids, and calls torch's SDPA with native GQA. Measured side by side in
  benchmarks/generate_cpu.py (`kv_cache` section; SmolLM2, fp32 greedy, 16 rows, 1 thread on a
  loaded machine: 52.6 vs 38.7 decode tokens/s, identical greedy tokens; see results/).
- Layout of one micro-batch's cache: columns [0, P) hold the shared prefix, columns [P, P + S)
  the prompt suffixes right-aligned (a row's padding sits just after the prefix and is masked),
  then one column per decode step. Every row's last prompt token is in the same column, so one
  step feeds one token per row. Position ids are per row and count real tokens only.
- Reuse granularity: (1) identical prompts (the `n` samples of a request, and equal prompts
  across requests) are prefilled once and their cache rows copied; (2) the longest common token
  prefix of all distinct prompts in a micro-batch (the judge rubric, a few-shot header, the chat
  template's system turn) is prefilled once with batch size 1 and copied into every row.
  Requests are sorted by prompt tokens before they are cut into micro-batches, so prompts that
  share a prefix land together. Nothing is cached across `generate` calls. On CPUs a shared
  prefix of SHARED_PREFIX_ATTENTION_MIN_TOKENS or more (the judge rubric) is not copied at all:
  it stays in its one-row cache and attention is split at it (every row's queries against the
  prefix in one call, each row against its own columns, merged by log-sum-exp).
- Finished rows are dropped from the batch (and the cache) once a quarter of them are done.
- Sampling: temperature, then top-k, then top-p over the renormalised top-k distribution, by
  inverse CDF with one uniform per token drawn from the sample's own generator, so a sample
  depends only on its seed and sample index, not on the batch. Padded vocabulary rows (vocab
  padded for TP) are cut off before anything sees them.
- TP > 1: logits are all-gathered over the TP group, every rank samples, and TP rank 0's tokens
  and log-probs are broadcast so all ranks continue identically. Every TP rank must call
  `generate` with the same requests. PP > 1 and sequence parallelism are refused with a clear
  error (generate from a PP=1 copy: checkpoints reshard on load).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from megatron_selfreward.config import Config
from megatron_selfreward.generation.engine import (
    FinishReason,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    Sample,
    SamplingParams,
    engine_rates,
    sample_seed,
)
from megatron_selfreward.generation.packed_linear import PackedLinear, packing_supported
from megatron_selfreward.generation.sampling import sample_tokens

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bounds the [rows, heads, chunk, length] attention scores of a long prefill.
PREFILL_CHUNK_TOKENS = 256
# Dropping finished rows copies the cache; do it once this share of the batch is done.
COMPACT_FRACTION = 0.25
# Decoding a short window of tail tokens is enough to see a stop string appear.
STOP_WINDOW_EXTRA_TOKENS = 8
# A shared prefix at least this long stays in one cache row and is attended to once for all
# rows (CPU); shorter ones are copied into every row, where one attention call is cheaper.
SHARED_PREFIX_ATTENTION_MIN_TOKENS = 128


class KVCache:
    """Per-layer keys (after RoPE) and values, [rows, kv_heads, max_len, head_dim] each.

    Buffers are allocated on first write, from the shapes the model produces (so a TP rank's
    share of KV heads needs no bookkeeping here). `valid[r, c]` says column c of row r holds a
    real token; padding columns are never attended to. With a `prefix` cache attached (one row,
    `prefix.length` columns, shared by every row), columns [0, prefix.length) of the rows are
    never written nor read: attention takes them from the prefix.
    """

    def __init__(self, rows: int, max_len: int, num_layers: int, device: torch.device) -> None:
        self.rows, self.max_len = rows, max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.prefix: KVCache | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.length

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [rows, s, kv_heads, dim] keys/values at column `start`; return columns [0, start+s)."""
        if self.keys[layer] is None:
            _, _, groups, dim = key.shape
            shape = (self.rows, groups, self.max_len, dim)
            self.keys[layer] = key.new_empty(shape)
            self.values[layer] = value.new_empty(shape)
        end = start + key.shape[1]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = key.transpose(1, 2)
        values[:, :, start:end] = value.transpose(1, 2)
        return keys[:, :, :end], values[:, :, :end]

    def take_rows(self, index: torch.Tensor) -> "KVCache":
        """A cache of rows `index` (repeats allowed), copying only the columns written so far."""
        new = KVCache(len(index), self.max_len, len(self.keys), self.valid.device)
        new.prefix = self.prefix
        p, n = self.prefix_len, self.length
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            if keys is None or values is None:
                continue
            new.keys[layer] = keys.new_empty((len(index),) + tuple(keys.shape[1:]))
            new.values[layer] = values.new_empty((len(index),) + tuple(values.shape[1:]))
            new.keys[layer][:, :, p:n] = keys[index, :, p:n]
            new.values[layer][:, :, p:n] = values[index, :, p:n]
        new.valid[:, :n] = self.valid[index, :n]
        new.length = n
        return new

    def attach_prefix(self, prefix: "KVCache") -> None:
        """Share a one-row cache's columns with every row without copying them."""
        self.prefix = prefix
        self.valid[:, : prefix.length] = prefix.valid[:, : prefix.length]
        self.length = prefix.length

    def fill_prefix(self, prefix: "KVCache") -> None:
        """Copy a one-row cache's columns into every row (the shared prefix)."""
        n = prefix.length
        for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values)):
            if keys is None or values is None:
                continue
            if self.keys[layer] is None:
                shape = (self.rows, keys.shape[1], self.max_len, keys.shape[3])
                self.keys[layer], self.values[layer] = keys.new_empty(shape), values.new_empty(shape)
            self.keys[layer][:, :, :n] = keys[:, :, :n]
            self.values[layer][:, :, :n] = values[:, :, :n]
        self.valid[:, :n] = prefix.valid[:, :n]
        self.length = n


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] on the last dim, in one op (times [-sin, sin] that is rotate_half * sin)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


@dataclass
class _LayerWeights:
    """One decoder layer's tensors for the direct path (this TP rank's shards)."""

    attn_norm: torch.Tensor
    attn_eps: float
    qkv: PackedLinear
    proj: PackedLinear
    mlp_norm: torch.Tensor
    mlp_eps: float
    fc1: PackedLinear  # [gate; up], what prefill runs as one GEMM
    gate: PackedLinear  # the halves of fc1, what a packed decode step runs with fused epilogues
    up: PackedLinear
    fc2: PackedLinear
    groups: int
    heads_per_group: int
    head_dim: int

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ gate.T) * (x @ up.T): two GEMMs with the activation and product fused
        (decode on oneDNN), else one [gate; up] GEMM and two elementwise ops."""
        if self.gate.runs_packed(x):
            return self.up.mul(x, self.gate.silu(x))
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return F.silu(gate).mul_(up)


def _norm_eps(norm: Any) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps


def _direct_weights(layer: Any, tp_size: int, dtype: torch.dtype, pack: bool) -> _LayerWeights | None:
    """The layer's tensors if it is the plain local-spec Llama layer, else None (module path).

    The direct path skips Megatron's per-call autograd-function and TP-region wrappers, which
    cost about as much as the GEMMs themselves at decode batch sizes on a CPU.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    attn, mlp, conf = layer.self_attention, layer.mlp, layer.config
    norms = (layer.input_layernorm, layer.pre_mlp_layernorm)
    linears = (attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
    plain = (
        all(isinstance(n, torch.nn.RMSNorm) and n.weight is not None for n in norms)
        and [type(m) for m in linears] == [ColumnParallelLinear, RowParallelLinear] * 2
        and all(getattr(m, "bias", None) is None for m in linears)
        and all(n is None or isinstance(n, IdentityOp) for n in (attn.q_layernorm, attn.k_layernorm))
        and conf.gated_linear_unit and conf.activation_func is F.silu
        and not conf.use_te_activation_func and not conf.attention_output_gate
        and conf.num_query_groups >= tp_size
    )
    if not plain:
        return None
    groups = attn.num_query_groups_per_partition

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype)  # a view of the parameter when the dtype already matches

    def linear(t: torch.Tensor) -> PackedLinear:
        return PackedLinear(cast(t), pack)

    fc1 = cast(mlp.linear_fc1.weight)
    ffn = fc1.shape[0] // 2  # this rank's [gate; up] halves (Megatron shards each half over TP)
    return _LayerWeights(
        cast(norms[0].weight), _norm_eps(norms[0]), linear(attn.linear_qkv.weight),
        linear(attn.linear_proj.weight), cast(norms[1].weight), _norm_eps(norms[1]),
        PackedLinear(fc1, False), PackedLinear(fc1[:ffn], pack), PackedLinear(fc1[ffn:], pack),
        linear(mlp.linear_fc2.weight), groups,
        attn.num_attention_heads_per_partition // groups, attn.hidden_size_per_attention_head,
    )


class MegatronRunner:
    """Forward passes of a Megatron-Core GPTModel (PP=1) over a KVCache.

    Works in [batch, seq, hidden] layout: Megatron's linear layers only touch the last dim, and
    the attention core is ours. Two paths, equal up to rounding (both tested against the model's
    own forward): the direct path runs plain-Llama local-spec layers with the layer's weight
    tensors (optionally cast to `dtype`, e.g. bfloat16 for CPUs with AMX); any other layer (TE
    spec, gated attention, ...) runs through its own Megatron modules in the model's dtype.
    On CPUs the direct path's decode GEMMs run on oneDNN-packed copies of the weights
    (packed_linear.py; `pack=False` turns that off) and its ops run outside torch-function
    modes (cpu_compat's CUDA->CPU redirect costs microseconds per op and nothing here needs it).
    When `dtype` is the model's, the direct path follows training updates: it holds views of
    the parameters and `refresh()` re-packs once a parameter changed. A cast copy (another
    dtype) is a snapshot, refreshed by `MegatronEngine.load_weights`.
    """

    def __init__(self, model: Any, vocab_size: int, dtype: torch.dtype | None = None,
                 pack: bool | None = None) -> None:
        from megatron.core import parallel_state

        from megatron_selfreward.megatron.checkpoint import unwrap

        self.model = unwrap(model)
        conf = self.model.config
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError(
                "MegatronEngine runs with pipeline_model_parallel_size=1 only; generate with a "
                "PP=1 copy of the model (checkpoints reshard on load) or use the TRT-LLM engine"
            )
        if conf.sequence_parallel:
            raise NotImplementedError(
                "MegatronEngine needs a model built with parallel.sequence_parallel=false "
                "(decode steps feed one token per row, which cannot be split over TP ranks)"
            )
        if self.model.position_embedding_type != "rope" or conf.rotary_interleaved:
            raise NotImplementedError("MegatronEngine supports non-interleaved RoPE models only")
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        self.layers = list(self.model.decoder.layers)
        self.final_norm = self.model.decoder.final_layernorm
        self.model_dtype = conf.params_dtype
        self.dtype = dtype or self.model_dtype
        self.device = self.model.embedding.word_embeddings.weight.device
        self.pack = packing_supported(self.dtype, self.device) if pack is None else pack
        self._build_direct()
        if self.direct is None and self.dtype != self.model_dtype:
            raise NotImplementedError(
                f"generation dtype {self.dtype} differs from the model's {self.model_dtype}, which "
                "only the direct (local-spec Llama) path supports; leave dtype unset"
            )
        rope = self.model.rotary_pos_emb
        self.inv_freq = rope.inv_freq.float().to(self.device)
        factor = rope.seq_len_interpolation_factor
        self.position_scale = 1.0 / factor if factor else 1.0
        self.softmax_scale = self.layers[0].self_attention.core_attention.softmax_scale
        self.vocab_size = vocab_size

    def _build_direct(self) -> None:
        """The direct path's weights (views, casts, packed copies), or direct = None."""
        direct = [_direct_weights(layer, self.tp_size, self.dtype, self.pack) for layer in self.layers]
        plain_norm = isinstance(self.final_norm, torch.nn.RMSNorm) and self.final_norm.weight is not None
        self.direct = direct if plain_norm and all(w is not None for w in direct) else None
        if self.model.share_embeddings_and_output_weights:
            weight = self.model.shared_embedding_or_output_weight()
        else:
            weight = self.model.output_layer.weight
        self.head = PackedLinear(weight.detach().to(self.dtype), self.pack and self.direct is not None)
        if self.direct is not None:
            self.final_norm_weight = self.final_norm.weight.detach().to(self.dtype)
            self.final_norm_eps = _norm_eps(self.final_norm)
        self._versions = self._param_versions()

    def _param_versions(self) -> list[int]:
        return [p._version for p in self.model.parameters()]

    def refresh(self) -> None:
        """Re-pack the direct path's weights if a parameter changed in place since they were
        packed (training, a load) and the direct path follows the parameters (same dtype)."""
        if (self.pack and self.direct is not None and self.dtype == self.model_dtype
                and self._param_versions() != self._versions):
            self._build_direct()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.head.weight

    def _plain_torch(self) -> contextlib.AbstractContextManager:
        """No torch-function modes for the direct path's own ops (see the class docstring)."""
        return torch._C.DisableTorchFunction() if self.direct is not None else contextlib.nullcontext()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [b, s, 1, 1, rot_dim] (fp32 as megatron computes them, then
        cast): x * cos + swap_halves(x) * sin equals megatron's x * cos + rotate_half(x) * sin."""
        freqs = (positions.float() * self.position_scale)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, None, :]
        sin = emb.sin()
        half = sin.shape[-1] // 2
        sin[..., :half].neg_()
        return emb.cos().to(self.dtype), sin.to(self.dtype)

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE with _rope's cos and sign-folded sin (broadcast against x's leading dims)."""
        rot = cos.shape[-1]
        if rot == x.shape[-1]:
            return torch.addcmul(x * cos, _swap_halves(x), sin)
        head, tail = x[..., :rot], x[..., rot:]
        return torch.cat((torch.addcmul(head * cos, _swap_halves(head), sin), tail), dim=-1)

    @staticmethod
    def _mask(valid: torch.Tensor, start: int, steps: int) -> torch.Tensor:
        """[b, 1, steps, start+steps] True = attend: valid earlier columns, causal within the chunk.

        Each query may always see its own column, so padding queries get a finite (ignored)
        output instead of NaN, which would otherwise leak through 0 * NaN into the cache.
        """
        length = start + steps
        cols = torch.arange(length, device=valid.device)
        rows = torch.arange(start, length, device=valid.device)
        causal = cols[None, :] <= rows[:, None]
        mask = causal[None] & valid[:, None, :length]
        mask |= (cols[None, :] == rows[:, None])[None]
        return mask[:, None]

    def _attend(self, index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Cache append and SDPA on rotated q/k: [b, s, heads, dim] in, [b, s, heads * dim] out."""
        keys, values = cache.write(index, key, value, start)
        if cache.prefix is not None:
            return self._attend_with_prefix(index, query, keys, values, mask, cache)
        context = F.scaled_dot_product_attention(
            query.transpose(1, 2), keys, values, attn_mask=mask, scale=self.softmax_scale,
            enable_gqa=keys.shape[1] != query.shape[2],
        )
        return context.transpose(1, 2).flatten(2)

    def _attend_with_prefix(self, index: int, query: torch.Tensor, keys: torch.Tensor,
                            values: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attention split at the shared prefix and merged by log-sum-exp (cascade attention).

        The prefix part is one call with every row's queries against the one-row prefix cache
        (its keys and values are read once, not once per row); the suffix part is per row over
        its own columns. GQA folds a group's query heads into the query length, so neither part
        repeats KV heads. CPU only (torch's flash kernel for CPU returns the log-sum-exp).
        """
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        b, s, heads, dim = query.shape
        p, groups = cache.prefix_len, keys.shape[1]
        per_group = heads // groups
        q = query.view(b, s, groups, per_group, dim)
        prefix_keys = cache.prefix.keys[index][:, :, :p]
        prefix_values = cache.prefix.values[index][:, :, :p]
        # The prefix is whole and precedes every query: no mask.
        q_all = q.permute(2, 0, 1, 3, 4).reshape(1, groups, b * s * per_group, dim)
        out_p, lse_p = flash(q_all, prefix_keys, prefix_values, scale=self.softmax_scale)
        out_p = out_p.view(groups, b, s, per_group, dim).permute(1, 2, 0, 3, 4)
        lse_p = lse_p.view(groups, b, s, per_group).permute(1, 2, 0, 3)
        q_rows = q.permute(0, 2, 1, 3, 4).reshape(b, groups, s * per_group, dim)
        suffix_mask = mask[..., p:]
        if suffix_mask.dtype == torch.bool:
            suffix_mask = torch.zeros(suffix_mask.shape, dtype=query.dtype, device=query.device
                                      ).masked_fill_(~suffix_mask, -math.inf)
        suffix_mask = suffix_mask[:, :, :, None].expand(-1, -1, -1, per_group, -1).reshape(
            b, 1, s * per_group, -1)
        out_s, lse_s = flash(q_rows, keys[:, :, p:], values[:, :, p:], attn_mask=suffix_mask,
                             scale=self.softmax_scale)
        out_s = out_s.view(b, groups, s, per_group, dim).permute(0, 2, 1, 3, 4)
        lse_s = lse_s.view(b, groups, s, per_group).permute(0, 2, 1, 3)
        lse = torch.logaddexp(lse_p, lse_s)
        out = out_p * (lse_p - lse).exp_()[..., None] + out_s * (lse_s - lse).exp_()[..., None]
        return out.to(query.dtype).reshape(b, s, heads * dim)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs over TP (what RowParallelLinear does)."""
        if self.tp_group is not None:
            torch.distributed.all_reduce(partial, group=self.tp_group)
        return partial

    def _residual(self, linear: PackedLinear, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + x @ W.T for a row-parallel W: summed over TP first, else fused into the GEMM."""
        if self.tp_group is None:
            return linear.add(x, hidden)
        return hidden + self._reduce(linear(x))

    def _direct_layer(self, index: int, w: _LayerWeights, hidden: torch.Tensor, rope: tuple,
                      mask: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        b, s, h = hidden.shape
        x = F.rms_norm(hidden, (h,), w.attn_norm, w.attn_eps)
        # Megatron's fused layout: per KV group, its query heads, then one key and one value head.
        qkv = w.qkv(x).view(b, s, w.groups, w.heads_per_group + 2, w.head_dim)
        rotated = self._apply_rope(qkv[:, :, :, :-1], *rope)  # queries and key in one pass
        query = rotated[:, :, :, :-1].reshape(b, s, w.groups * w.heads_per_group, w.head_dim)
        key, value = rotated[:, :, :, -1], qkv[:, :, :, -1]
        context = self._attend(index, query, key, value, mask, cache, start)
        hidden = self._residual(w.proj, context, hidden)
        return self._residual(w.fc2, w.swiglu(F.rms_norm(hidden, (h,), w.mlp_norm, w.mlp_eps)), hidden)

    def _module_layer(self, index: int, layer: Any, hidden: torch.Tensor, rope: tuple,
                      mask: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        attn = layer.self_attention
        query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(hidden))
        cos, sin = (t.squeeze(3) for t in rope)  # [b, s, 1, rot] against [b, s, heads, dim]
        query, key = self._apply_rope(query, cos, sin), self._apply_rope(key, cos, sin)
        context = self._attend(index, query, key, value, mask, cache, start)
        out, bias = attn.linear_proj(context)
        hidden = hidden + (out if bias is None else out + bias)
        out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
        return hidden + (out if bias is None else out + bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits [..., vocab_size] from final hidden states."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if self.direct is not None:
            with self._plain_torch():
                normed = F.rms_norm(hidden, (hidden.shape[-1],), self.final_norm_weight, self.final_norm_eps)
                logits = self.head(normed)
        else:
            logits = self.head(self.final_norm(hidden))
        if self.tp_size > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.vocab_size].float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, token_valid: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """Append [b, s] tokens to the cache; return the logits [b, vocab] of the last column."""
        start, steps = cache.length, tokens.shape[1]
        cache.valid[:, start : start + steps] = token_valid
        # The embedding module handles TP (vocab-parallel lookup + all-reduce).
        hidden = self.model.embedding.word_embeddings(tokens).to(self.dtype)
        with self._plain_torch():
            mask = self._mask(cache.valid, start, steps)
            rope = self._rope(positions)
            if self.direct is not None:
                # One additive mask for every layer instead of a bool mask SDPA converts per call.
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
                for index, w in enumerate(self.direct):
                    hidden = self._direct_layer(index, w, hidden, rope, mask, cache, start)
        if self.direct is None:
            for index, layer in enumerate(self.layers):
                hidden = self._module_layer(index, layer, hidden, rope, mask, cache, start)
        cache.length = start + steps
        return self.logits(hidden[:, -1])

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, token_valid: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """`forward` in column chunks of PREFILL_CHUNK_TOKENS; logits of the last column."""
        logits = None
        for start in range(0, tokens.shape[1], PREFILL_CHUNK_TOKENS):
            part = slice(start, start + PREFILL_CHUNK_TOKENS)
            logits = self.forward(tokens[:, part], positions[:, part], token_valid[:, part], cache)
        assert logits is not None
        return logits


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Row:
    """One sample being generated: a row of a micro-batch."""

    request_index: int
    sample_index: int
    prompt: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix of the prompts, leaving every prompt at least one token."""
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _right_aligned(prompts: Sequence[tuple[int, ...]], start: int, width: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions and validity [rows, width] of prompt[start:], padded on the left."""
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    positions = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        suffix = prompt[start:start + width]
        tokens[row, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        positions[row, width - len(suffix):] = torch.arange(start, start + len(suffix))
        valid[row, width - len(suffix):] = True
    return tokens.to(device), positions.to(device), valid.to(device)


_STAT_KEYS = (
    "requests", "samples", "micro_batches", "prefill_tokens_requested", "prefill_tokens_computed",
    "prefill_pad_tokens", "decode_tokens", "decode_row_steps", "decode_steps",
    "prefill_time_s", "decode_time_s",
)


class MegatronEngine(GenerationEngine):
    """Batched KV-cache generation on this process's Megatron-Core GPTModel (see module docs).

    model: the GPTModel (or its DDP wrapper) of this rank; cfg: the run config (vocab size,
    max_seq_len, generation.batch_size as the default rows per micro-batch, pipeline.seed);
    tokenizer: anything with `decode(list[int]) -> str`, needed for stop strings and to fill
    `Sample.text`; eos_token_ids: default = the tokenizer's `eos_token_id`; dtype: compute
    dtype of generation ("bfloat16" runs fp32-trained weights as a bf16 copy, several times
    faster on CPUs with AMX); default = the model's.
    """

    def __init__(self, model: Any, cfg: Config, tokenizer: Any = None,
                 eos_token_ids: Sequence[int] | None = None, *, max_batch_size: int | None = None,
                 prefix_reuse: bool = True, seed: int | None = None,
                 dtype: str | torch.dtype | None = None) -> None:
        self.cfg = cfg
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.runner = MegatronRunner(model, cfg.model.vocab_size, self.dtype)
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_batch_size = max_batch_size or cfg.generation.batch_size
        self.prefix_reuse = prefix_reuse
        self.seed = cfg.pipeline.seed if seed is None else seed
        self.max_seq_len = cfg.model.max_seq_len
        self._stats: dict[str, float] = {}
        self.reset_stats()

    # -- protocol --------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, float]:
        """Counters since `reset_stats`, plus derived rates.

        prefill_tokens_requested: prompt tokens over all samples (what prefilling every sample
        separately would compute); prefill_tokens_computed: real tokens actually run;
        prefill_pad_tokens: padding columns run besides; decode_tokens: tokens generated;
        decode_row_steps: rows run in decode steps (finished rows wait for compaction).
        """
        return {**self._stats, **engine_rates(self._stats)}

    def reset_stats(self) -> None:
        self._stats = {key: 0.0 if key.endswith("_s") else 0 for key in _STAT_KEYS}

    def load_weights(self, source: Any) -> None:
        """New weights, once per iteration: a Megatron distributed checkpoint directory (any TP),
        or a GPTModel (the trained one, possibly re-wrapped). Refreshes cast weight copies."""
        if isinstance(source, (str, Path)):
            from megatron_selfreward.megatron.checkpoint import load_model

            load_model(self.runner.model, source)
            source = self.runner.model
        if not isinstance(source, torch.nn.Module):
            raise TypeError(f"load_weights takes a checkpoint directory or a GPTModel, not {type(source)}")
        self.runner = MegatronRunner(source, self.cfg.model.vocab_size, self.dtype)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        rows = self._rows(requests)
        self.runner.refresh()
        with self._inference_mode():
            for batch in self._micro_batches(rows):
                self._run_batch(batch)
        by_request: list[list[Sample]] = [[] for _ in requests]
        for row in sorted(rows, key=lambda r: (r.request_index, r.sample_index)):
            by_request[row.request_index].append(self._to_sample(row))
        self._stats["requests"] += len(requests)
        self._stats["samples"] += len(rows)
        return [GenerationResult(r.request_id, s) for r, s in zip(requests, by_request)]

    # -- planning ----------------------------------------------------------------------------

    def _rows(self, requests: Sequence[GenerationRequest]) -> list[_Row]:
        """One row per sample, validated, in prompt order (shared prefixes adjacent)."""
        rows: list[_Row] = []
        order = sorted(range(len(requests)), key=lambda i: requests[i].prompt_token_ids)
        for index in order:
            request = requests[index]
            prompt, params = tuple(request.prompt_token_ids), request.params
            if params.stop_strings and self.tokenizer is None:
                raise ValueError(f"request {request.request_id!r}: stop_strings need a tokenizer; "
                                 "pass tokenizer= to MegatronEngine")
            if len(prompt) >= self.max_seq_len:
                raise ValueError(f"request {request.request_id!r}: prompt has {len(prompt)} tokens, "
                                 f"model.max_seq_len is {self.max_seq_len}")
            if min(prompt) < 0 or max(prompt) >= self.runner.vocab_size:
                raise ValueError(f"request {request.request_id!r}: token id outside the vocabulary "
                                 f"[0, {self.runner.vocab_size})")
            # Generation stops at the model's context length ("length") rather than failing.
            max_new = min(params.max_new_tokens, self.max_seq_len - len(prompt))
            for j in range(params.n):
                seed = sample_seed(params.seed, j, engine_seed=self.seed, request_id=request.request_id)
                rows.append(_Row(index, j, prompt, params, max_new, seed))
        return rows

    def _micro_batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        """Up to max_batch_size rows each; a request's samples are split only if n exceeds it."""
        batch: list[_Row] = []
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and rows[j].request_index == rows[i].request_index:
                j += 1
            group = rows[i:j]
            if batch and len(batch) + len(group) > self.max_batch_size:
                yield batch
                batch = []
            while len(group) > self.max_batch_size:
                yield group[: self.max_batch_size]
                group = group[self.max_batch_size:]
            batch.extend(group)
            i = j
        if batch:
            yield batch

    @contextlib.contextmanager
    def _inference_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) for the duration, restoring the trainer's mode afterwards."""
        model = self.runner.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            model.train(was_training)

    # -- one micro-batch ----------------------------------------------------------------------

    def _run_batch(self, batch: list[_Row]) -> None:
        start = time.perf_counter()
        cache, logits = self._prefill(batch)
        prefilled = time.perf_counter()
        self._decode(batch, cache, logits)
        self._stats["prefill_time_s"] += prefilled - start
        self._stats["decode_time_s"] += time.perf_counter() - prefilled
        self._stats["micro_batches"] += 1

    def _prefill(self, batch: list[_Row]) -> tuple[KVCache, torch.Tensor]:
        """Prefill each distinct prompt once (shared prefix once), then one cache row per sample."""
        unique: dict[tuple[int, ...], int] = {}
        row_to_unique = [unique.setdefault(row.prompt, len(unique)) for row in batch]
        prompts = list(unique)
        shared = shared_prefix_len(prompts) if self.prefix_reuse and len(prompts) > 1 else 0
        width = max(len(p) for p in prompts) - shared
        max_len = shared + width + max(row.max_new_tokens for row in batch)
        layers = len(self.runner.layers)
        device = self.runner.device
        cache = KVCache(len(prompts), max_len, layers, device)
        if shared:
            prefix = KVCache(1, shared, layers, device)
            tokens, positions, valid = _right_aligned(prompts[:1], 0, shared, device)
            self.runner.prefill(tokens, positions, valid, prefix)
            if shared >= SHARED_PREFIX_ATTENTION_MIN_TOKENS and device.type == "cpu":
                cache.attach_prefix(prefix)
            else:
                cache.fill_prefix(prefix)
        tokens, positions, valid = _right_aligned(prompts, shared, width, device)
        logits = self.runner.prefill(tokens, positions, valid, cache)
        if row_to_unique != list(range(len(prompts))):
            index = torch.tensor(row_to_unique, dtype=torch.long, device=device)
            cache, logits = cache.take_rows(index), logits[index]
        computed = shared + sum(len(p) - shared for p in prompts)
        self._stats["prefill_tokens_requested"] += sum(len(row.prompt) for row in batch)
        self._stats["prefill_tokens_computed"] += computed
        self._stats["prefill_pad_tokens"] += len(prompts) * width - (computed - shared)
        return cache, logits

    def _decode(self, batch: list[_Row], cache: KVCache, logits: torch.Tensor) -> None:
        """Sample, append, stop, drop finished rows, step the model; until every row is done."""
        live = list(range(len(batch)))  # cache row k holds batch[live[k]]
        params = self._row_tensors(batch)
        device = self.runner.device
        positions = torch.tensor([len(row.prompt) for row in batch], dtype=torch.long, device=device)
        step = 0
        while True:
            temperature, top_k, top_p, uniforms = params
            with torch._C.DisableTorchFunction():  # plain torch ops (see MegatronRunner)
                tokens, logprobs = sample_tokens(logits, temperature, top_k, top_p, uniforms[:, step])
            tokens, logprobs = self._sync_tensor_parallel(tokens, logprobs)
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()  # one device sync
            for k, index in enumerate(live):
                if batch[index].finish_reason is None:
                    self._append(batch[index], token_list[k], logprob_list[k])
            alive = [k for k, index in enumerate(live) if batch[index].finish_reason is None]
            if not alive:
                return
            if len(live) - len(alive) >= max(1.0, COMPACT_FRACTION * len(live)):
                keep = torch.tensor(alive, dtype=torch.long, device=device)
                cache, tokens, positions = cache.take_rows(keep), tokens[keep], positions[keep]
                params = tuple(t[keep] for t in params)
                live = [live[k] for k in alive]
            step += 1
            ones = torch.ones(len(live), 1, dtype=torch.bool, device=device)
            logits = self.runner.forward(tokens[:, None], positions[:, None], ones, cache)
            positions = positions + 1
            self._stats["decode_steps"] += 1
            self._stats["decode_row_steps"] += len(live)

    def _row_tensors(self, batch: list[_Row]) -> tuple[torch.Tensor, ...]:
        """Per-row temperature, top_k, top_p and the row's uniforms for every step."""
        steps = max(row.max_new_tokens for row in batch)
        uniforms = torch.zeros(len(batch), steps, dtype=torch.float64)
        for k, row in enumerate(batch):
            if not row.params.greedy:
                gen = torch.Generator().manual_seed(row.seed)
                uniforms[k, : row.max_new_tokens] = torch.rand(row.max_new_tokens, generator=gen,
                                                               dtype=torch.float64)
        temperature = torch.tensor([row.params.temperature for row in batch], dtype=torch.float32)
        top_k = torch.tensor([row.params.top_k for row in batch], dtype=torch.long)
        top_p = torch.tensor([row.params.top_p for row in batch], dtype=torch.float32)
        # Uniforms come from CPU generators: the same samples on any device.
        return tuple(t.to(self.runner.device) for t in (temperature, top_k, top_p, uniforms))

    def _sync_tensor_parallel(self, tokens: torch.Tensor, logprobs: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every TP rank continues with TP rank 0's tokens (bitwise-equal logits are not promised)."""
        if self.runner.tp_size == 1:
            return tokens, logprobs
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        packed = torch.stack([tokens.double(), logprobs.double()])
        dist.broadcast(packed, src=ps.get_tensor_model_parallel_src_rank(),
                       group=ps.get_tensor_model_parallel_group())
        return packed[0].long(), packed[1].float()

    # -- stopping and text --------------------------------------------------------------------

    def _append(self, row: _Row, token: int, logprob: float) -> None:
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        self._stats["decode_tokens"] += 1
        if token in self.eos_token_ids:
            row.finish_reason = "eos"
        elif token in row.params.stop_token_ids:
            row.finish_reason = "stop"
        elif row.params.stop_strings and self._ends_with_stop_string(row):
            row.finish_reason = "stop"
        elif len(row.token_ids) >= row.max_new_tokens:
            row.finish_reason = "length"

    def _ends_with_stop_string(self, row: _Row) -> bool:
        """Decode only the tail: a stop string completed by this token lies within it."""
        window = max(len(s) for s in row.params.stop_strings) + STOP_WINDOW_EXTRA_TOKENS
        tail = self.tokenizer.decode(row.token_ids[-window:])
        return any(s in tail for s in row.params.stop_strings)

    def _to_sample(self, row: _Row) -> Sample:
        assert row.finish_reason is not None
        sample = Sample(list(row.token_ids), list(row.logprobs), row.finish_reason)
        if self.tokenizer is not None:
            sample.text = self.decode_text(row.token_ids, row.finish_reason, row.params)
        return sample

