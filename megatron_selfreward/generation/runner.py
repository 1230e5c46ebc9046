"""Forward passes of a Megatron-Core GPTModel over a KV cache: what MegatronEngine steps.

- Plain Llama layers (the local spec) run on their weight tensors directly (GEMMs, rms_norm,
  attention, an all-reduce after row-parallel GEMMs): Megatron's per-call wrappers cost about as
  much as the GEMMs at decode batch sizes on a CPU. Other layers (the TE spec on GPUs) run
  through their Megatron modules.
- On CPUs the direct path's decode GEMMs take oneDNN-packed weights with the residual add and
  SwiGLU fused in (packed_linear.py), and a decode step's attention (RoPE, cache write, GQA
  attention) and RMSNorms run as C++ kernels (kernels/decode_cpu.cpp) when they build; prefill
  and every other device use torch's SDPA.
- The cache stores rotated keys, per-row position ids, and an optional shared prefix held once
  for all rows (cascade attention, see KVCache).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_selfreward.kernels import decode_cpu
from megatron_selfreward.generation.packed_linear import PackedLinear, packing_supported

# Bounds the [rows, heads, chunk, length] attention scores of a long prefill.
PREFILL_CHUNK_TOKENS = 256


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

    def relayout(self, index: torch.Tensor, rows: int, trim: int, max_len: int) -> "KVCache":
        """A cache of `rows` rows and `max_len` columns: rows `index` first (the rest empty and
        invalid), their columns [prefix_len + trim, length) moved down to start at prefix_len.

        Positions are per row, so moving columns changes no attention result; trimming columns
        that no kept row uses keeps a long-running batch's cache from growing without bound.
        This cache is consumed: each layer is released once copied, so the copy costs one
        layer's memory on top, not a second cache.
        """
        new = KVCache(rows, max_len, len(self.keys), self.valid.device)
        new.prefix = self.prefix
        p, n, m = self.prefix_len, self.length, len(index)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            if keys is None or values is None:
                continue
            new.keys[layer] = keys.new_empty((rows, keys.shape[1], max_len, keys.shape[3]))
            new.values[layer] = values.new_empty((rows, values.shape[1], max_len, values.shape[3]))
            new.keys[layer][:m, :, p:n - trim] = keys[index, :, p + trim:n]
            new.values[layer][:m, :, p:n - trim] = values[index, :, p + trim:n]
            self.keys[layer] = self.values[layer] = None
        new.valid[:, :p] = self.valid[:1, :p]  # the attached prefix: the same for every row
        new.valid[:m, p:n - trim] = self.valid[index, p + trim:n]
        new.length = n - trim
        return new

    def put_rows(self, slots: torch.Tensor, other: "KVCache | None") -> None:
        """Write `other`'s rows (its columns after the shared prefix, `other.length` wide in all,
        the same prefix attached) into rows `slots`, right-aligned to end at this cache's
        `length`; every other column of those rows after the prefix becomes invalid padding.
        `other` None: the rows hold nothing yet besides the prefix."""
        p, n = self.prefix_len, self.length
        width = 0 if other is None else other.length - p
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            if keys is None or values is None:
                continue
            # Padding is read (masked) by attention: zeros, never stale or uninitialised memory.
            keys[slots, :, p:n - width] = 0
            values[slots, :, p:n - width] = 0
            if width:
                keys[slots, :, n - width:n] = other.keys[layer][:, :, p:other.length]
                values[slots, :, n - width:n] = other.values[layer][:, :, p:other.length]
        self.valid[slots, p:] = False
        if width:
            self.valid[slots, n - width:n] = other.valid[:, p:other.length]

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


def softmax_scale(conf: Any) -> float:
    """The attention logits' scale, from the TransformerConfig alone: what megatron passes to its
    attention cores (`config.softmax_scale`, in `megatron.core.transformer.attention.Attention`),
    and their default 1/sqrt(head dim), head dim = `kv_channels`. The cores do not all keep it
    as an attribute: TE's DotProductAttention (2.3 and newer) has no `softmax_scale`."""
    if conf.softmax_scale is not None:
        return float(conf.softmax_scale)
    return 1.0 / math.sqrt(conf.kv_channels)


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
    `kernels` ("auto", "on", "off": generation.cpu_kernels): decode steps of the direct path on
    a CPU in fp32/bf16 run RoPE + cache write + attention and the RMSNorms as the C++ ops of
    kernels/decode_cpu.cpp (one call each per layer). When `dtype` is the model's, the direct path follows training updates: it holds views of
    the parameters and `refresh()` re-packs once a parameter changed. A cast copy (another
    dtype) is a snapshot, refreshed by `MegatronEngine.load_weights`.
    """

    def __init__(self, model: Any, vocab_size: int, dtype: torch.dtype | None = None,
                 pack: bool | None = None, kernels: str = "auto") -> None:
        from megatron.core import parallel_state

        from megatron_selfreward.megatron.checkpoint import unwrap

        self.model = unwrap(model)
        conf = self.model.config
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError(
                "MegatronEngine runs with pipeline_model_parallel_size=1 only; generate with a "
                "PP=1 copy of the model (checkpoints reshard on load) or use the TRT-LLM engine"
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
        self.softmax_scale = softmax_scale(conf)
        self.vocab_size = vocab_size
        self.kernels = self._use_kernels(kernels)

    @contextlib.contextmanager
    def sequence_parallel_off(self):
        """The model without sequence parallelism for the duration, restored afterwards.

        A decode step feeds one token per row, which cannot be split over TP ranks, so a model
        trained with sequence parallelism (a trainer's model handed to the engine) generates
        with it switched off, through megatron's own `set_model_to_sequence_parallel`
        (megatron.core.transformer.utils; megatron's text_generation_controller uses it the
        same way). Only activations change: weights are the same with and without it.
        """
        if not self.model.config.sequence_parallel:
            yield
            return
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        set_model_to_sequence_parallel(self.model, False)
        try:
            yield
        finally:
            set_model_to_sequence_parallel(self.model, True)

    def _use_kernels(self, mode: str) -> bool:
        """Whether decode steps run the C++ kernels (generation.cpu_kernels: auto, on, off)."""
        if mode == "off" or self.device.type != "cpu":
            return False
        if self.direct is None or self.dtype not in (torch.float32, torch.bfloat16):
            if mode == "on":
                raise ValueError(
                    "generation.cpu_kernels: on needs plain Llama (local-spec) layers in float32 or "
                    f"bfloat16; this model runs {self.dtype} through "
                    f"{'its direct path' if self.direct is not None else 'its Megatron modules'}. "
                    "Set generation.cpu_kernels: auto or off")
            return False
        return decode_cpu.load(required=mode == "on")

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

    def _rope_fp32(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sign-folded sin [b, s, rot_dim], as megatron computes them:
        x * cos + swap_halves(x) * sin equals megatron's x * cos + rotate_half(x) * sin."""
        freqs = (positions.float() * self.position_scale)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[..., : sin.shape[-1] // 2].neg_()
        return emb.cos(), sin

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """_rope_fp32's cos and sin as [b, s, 1, 1, rot_dim] in the compute dtype."""
        return tuple(t[:, :, None, None, :].to(self.dtype) for t in self._rope_fp32(positions))

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
                if self.kernels and hidden.is_contiguous():  # direct path here
                    normed = decode_cpu.rms_norm(hidden, self.final_norm_weight, self.final_norm_eps)
                else:
                    normed = F.rms_norm(hidden, (hidden.shape[-1],), self.final_norm_weight,
                                        self.final_norm_eps)
                logits = self.head(normed)
        else:
            logits = self.head(self.final_norm(hidden))
        if self.tp_size > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.vocab_size].float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, token_valid: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """Append [b, s] tokens to the cache; return the logits [b, vocab] of the last column."""
        with self.sequence_parallel_off():  # no-op inside MegatronEngine.generate: already off
            return self._forward(tokens, positions, token_valid, cache)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, token_valid: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
        start, steps = cache.length, tokens.shape[1]
        cache.valid[:, start : start + steps] = token_valid
        # The embedding module handles TP (vocab-parallel lookup + all-reduce).
        hidden = self.model.embedding.word_embeddings(tokens).to(self.dtype)
        if self.kernels and self.direct is not None and steps == 1 and cache.keys[0] is not None:
            with self._plain_torch():
                hidden = self._kernel_step(hidden, positions, cache, start)
            cache.length = start + 1
            return self.logits(hidden[:, -1])
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

    def _kernel_step(self, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                     start: int) -> torch.Tensor:
        """One decode step of the direct path with the C++ kernels: per layer two GEMM calls
        for attention (QKV, projection + residual), three for the MLP, one kernel call each for
        the two RMSNorms and for RoPE + cache write + attention (kernels/decode_cpu.cpp)."""
        rows = hidden.shape[0]
        cos, sin = (t.reshape(rows, -1) for t in self._rope_fp32(positions))
        prefix = cache.prefix
        for index, w in enumerate(self.direct or ()):
            x = decode_cpu.rms_norm(hidden, w.attn_norm, w.attn_eps)
            qkv = w.qkv(x).view(rows, w.groups, w.heads_per_group + 2, w.head_dim)
            shared = (None, None, 0) if prefix is None else (
                prefix.keys[index], prefix.values[index], prefix.length)
            context = decode_cpu.decode_attention(
                qkv, cos, sin, cache.keys[index], cache.values[index], cache.valid, *shared, start,
                self.softmax_scale)
            hidden = self._residual(w.proj, context.view(rows, 1, -1), hidden)
            x = decode_cpu.rms_norm(hidden, w.mlp_norm, w.mlp_eps)
            hidden = self._residual(w.fc2, w.swiglu(x), hidden)
        return hidden

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, token_valid: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """`forward` in column chunks of PREFILL_CHUNK_TOKENS; logits of the last column."""
        logits = None
        for start in range(0, tokens.shape[1], PREFILL_CHUNK_TOKENS):
            part = slice(start, start + PREFILL_CHUNK_TOKENS)
            logits = self.forward(tokens[:, part], positions[:, part], token_valid[:, part], cache)
        assert logits is not None
        return logits
