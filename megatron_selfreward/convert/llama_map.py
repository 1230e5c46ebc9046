"""Llama between Hugging Face and Megatron-Core: the name map and the tensor transforms.

Everything here is a small pure function except `load_hf_into_model`, which uses them to fill
this rank's in-memory GPTModel. The transforms (litgpt style, each proven by a logits test
against `transformers.LlamaForCausalLM` in tests/unit/test_convert_llama.py):

- QKV: HF keeps q_proj, k_proj, v_proj; Megatron's local spec fuses them into one
  `linear_qkv` whose rows are grouped per KV head (query group): for each group g,
  [the q heads of g, k_g, v_g]. Splitting its rows evenly over TP ranks then hands each rank
  whole groups, which is how megatron shards it.
- MLP: `linear_fc1` = cat(gate_proj, up_proj) (megatron's SwiGLU takes the first half as gate).
  Under TP, gate and up are sharded separately and each rank holds cat(gate_r, up_r).
- Vocabulary: megatron splits embedding and output rows over TP, so the row count is padded
  to a multiple of TP with zero rows; the reverse strips them.
- Tied embeddings: no `output_layer.weight` (and no `lm_head.weight`), except on a last
  pipeline stage that is not also the first, where megatron keeps its own copy.
- RoPE: both sides rotate halves (HF's rotate_half, megatron's rotary_interleaved=False), so
  q/k rows need no permutation.

Tensors are named by megatron's distributed-checkpoint names with the global layer index put
back (`decoder.layers.3.mlp.linear_fc1.weight`): those do not depend on the layer spec. The
Transformer Engine spec fuses each pre-norm into the next linear
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`); the local
spec's `input_layernorm.weight` / `pre_mlp_layernorm.weight` are saved under those same names.
`checkpoint_tensor_name` derives a name from a sharded-state-dict entry, `canonical_names` maps a
model's module names onto them; `megatron_selfreward/convert/hf_megatron.py` maps checkpoint
shards the same way.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterator

import torch

from megatron_selfreward.config import Config, ModelConfig
from megatron_selfreward.megatron.model import padded_vocab_size

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "canonical_names",
    "check_same_architecture",
    "checkpoint_tensor_name",
    "config_from_hf",
    "fuse_qkv",
    "hf_config_from_model",
    "hf_names",
    "hf_tensor_shapes",
    "hf_to_megatron",
    "hf_to_megatron_tensor",
    "load_hf_into_model",
    "megatron_names",
    "megatron_to_hf",
    "megatron_to_hf_tensor",
    "model_config_from_hf",
    "shard_for_tp",
    "split_qkv",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GetTensor = Callable[[str], torch.Tensor]

# The two pre-norms under their checkpoint names (TE's fused-norm names, see module doc).
_INPUT_NORM = "self_attention.linear_qkv.layer_norm_weight"
_PRE_MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
# Per-layer names, HF -> Megatron, for the tensors that map one to one.
_LAYER_DIRECT = {
    "input_layernorm.weight": _INPUT_NORM,
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": _PRE_MLP_NORM,
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


class UnsupportedModelError(ValueError):
    """The Hugging Face model is not a plain Llama this converter reproduces exactly."""


# ---------------------------------------------------------------------------------------------
# Configs


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """RoPE base; any RoPE scaling would change the model's function, so it is refused."""
    params = hf.get("rope_parameters") or {}
    for source in (hf.get("rope_scaling"), params):
        if not source:
            continue
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(
                f"{where}: RoPE scaling of type {rope_type!r} is not supported (megatron's "
                "local spec has plain RoPE); converting would silently change the model"
            )
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def _check_architecture(hf: dict[str, Any], where: str) -> None:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: architecture {archs or hf.get('model_type')!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    window = hf.get("sliding_window")
    if window is not None and window < hf.get("max_position_embeddings", 0):
        raise UnsupportedModelError(
            f"{where}: sliding-window attention (sliding_window={window}) is not supported"
        )
    checks = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "pretraining_tp": (hf.get("pretraining_tp", 1), 1),
    }
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise UnsupportedModelError(f"{where}: {key}={value!r} is not supported (need {wanted!r})")


def config_from_hf(hf_config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """ModelConfig field overrides for a HF Llama config.json (errors name `where`)."""
    _check_architecture(hf_config, where)
    try:
        heads = int(hf_config["num_attention_heads"])
        hidden = int(hf_config["hidden_size"])
        out = {
            "num_layers": int(hf_config["num_hidden_layers"]),
            "hidden_size": hidden,
            "ffn_hidden_size": int(hf_config["intermediate_size"]),
            "num_attention_heads": heads,
            "num_query_groups": int(hf_config.get("num_key_value_heads") or heads),
            "vocab_size": int(hf_config["vocab_size"]),
            "max_seq_len": int(hf_config.get("max_position_embeddings", 4096)),
            "rope_theta": _rope_theta(hf_config, where),
            "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
            # LlamaConfig's own default (PretrainedConfig's generic default would be True).
            "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        }
    except KeyError as err:
        raise UnsupportedModelError(f"{where}: missing required field {err}") from err
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise UnsupportedModelError(
            f"{where}: head_dim={head_dim} differs from hidden_size/num_attention_heads="
            f"{hidden // heads}, which megatron's config derives"
        )
    return out


def model_config_from_hf(hf_config: dict[str, Any], where: str = "config.json", **fields: Any) -> ModelConfig:
    return dataclasses.replace(ModelConfig(), **config_from_hf(hf_config, where), **fields)


def _model_cfg(cfg: Config | ModelConfig) -> ModelConfig:
    return cfg.model if isinstance(cfg, Config) else cfg


def hf_config_from_model(
    cfg: Config | ModelConfig, dtype: str = "float32", base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A transformers config.json for the model; `base` (the imported original) keeps its
    other fields (token ids, ...) so a round trip reproduces it."""
    m = _model_cfg(cfg)
    arch = {
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "head_dim": m.hidden_size // m.num_attention_heads,
    }
    if base is not None:
        out = dict(base)
        out.update(arch)
        if "rope_parameters" in out:
            out["rope_parameters"] = dict(out["rope_parameters"], rope_theta=m.rope_theta)
        if "rope_theta" in out or "rope_parameters" not in out:
            out["rope_theta"] = m.rope_theta
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or (
            ["torch_dtype"] if dtype != "float32" else [])
        out.update({k: dtype for k in keys})
        return out
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **arch,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": m.init_std, "pretraining_tp": 1,
        "use_cache": True,
        # Both spellings: transformers >= 5 reads rope_parameters, older readers rope_theta.
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
        "dtype": dtype, "torch_dtype": dtype,
    }


# ---------------------------------------------------------------------------------------------
# Tensor transforms


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """[q; k; v] rows -> per query group [q heads of g, k_g, v_g] (megatron's fused layout)."""
    hidden = q.shape[1]
    head_dim = q.shape[0] // heads
    qg = q.reshape(groups, heads // groups * head_dim, hidden)
    kg = k.reshape(groups, head_dim, hidden)
    vg = v.reshape(groups, head_dim, hidden)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, hidden)


def split_qkv(
    qkv: torch.Tensor, heads: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = qkv.shape[1]
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    per_group = heads // groups * head_dim
    grouped = qkv.reshape(groups, per_group + 2 * head_dim, hidden)
    q, k, v = grouped.split([per_group, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# ---------------------------------------------------------------------------------------------
# Name maps and streams


def _layer_range(cfg: Config, layers: range | None) -> range:
    return range(cfg.model.num_layers) if layers is None else layers


def megatron_names(
    cfg: Config, layers: range | None = None, *, pre_process: bool = True, post_process: bool = True
) -> list[str]:
    """The megatron tensors a stage holding `layers` has (see module doc on names and tying)."""
    names = [EMBEDDING] if pre_process else []
    for i in _layer_range(cfg, layers):
        p = f"decoder.layers.{i}."
        names += [p + _INPUT_NORM, p + _QKV, p + _LAYER_DIRECT["self_attn.o_proj.weight"],
                  p + _PRE_MLP_NORM, p + _FC1, p + "mlp.linear_fc2.weight"]
    if post_process:
        names.append(FINAL_NORM)
        if not cfg.model.tie_embeddings or not pre_process:
            names.append(OUTPUT)
    return names


def hf_tensor_shapes(cfg: Config | ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes, in the order transformers writes them."""
    m = _model_cfg(cfg)
    h, head_dim = m.hidden_size, m.hidden_size // m.num_attention_heads
    q_rows, kv_rows = m.num_attention_heads * head_dim, m.num_query_groups * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q_rows, h),
            p + "self_attn.k_proj.weight": (kv_rows, h), p + "self_attn.v_proj.weight": (kv_rows, h),
            p + "self_attn.o_proj.weight": (h, q_rows), p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (m.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": (m.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, m.ffn_hidden_size),
        })
    shapes["model.norm.weight"] = (h,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, h)
    return shapes


def hf_names(cfg: Config | ModelConfig) -> list[str]:
    return list(hf_tensor_shapes(cfg))


_MEGATRON_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# A per-layer checkpoint key: all layers' tensors stacked under one key, no layer index.
_STACKED_LAYER_KEY = re.compile(r"decoder\.layers\.(?!\d)(.+)")


def checkpoint_tensor_name(entry: Any, prefix: str = "") -> str:
    """Our name for a ShardedTensor (or ShardedTensorFactory) of megatron's sharded state dict.

    That is its distributed-checkpoint key less `prefix`, with the global layer index put back:
    `TransformerBlock.sharded_state_dict` stacks a per-layer tensor of every layer under one key
    along a prepended axis 0 (the global offset on it is the layer), and
    `TransformerLayer.sharded_state_dict` renames keys by its spec's `sharded_state_dict_keys_map`
    (the local spec's norms onto TE's fused names). The result is the same for every layer spec.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):  # the SwiGLU fc1 split: its shards share the key
        entry = next(iter(nested_values(entry.build())))
    if not entry.key.startswith(prefix):
        raise KeyError(f"checkpoint key {entry.key!r} lacks the prefix {prefix!r}")
    key = entry.key[len(prefix):]
    match = _STACKED_LAYER_KEY.fullmatch(key)
    return key if match is None else f"decoder.layers.{entry.global_offset[0]}.{match.group(1)}"


def canonical_names(model: Any) -> dict[str, str]:
    """This rank's module state-dict names -> our (spec-independent) names, for the per-layer
    tensors, read off the model's own `sharded_state_dict()` (see `checkpoint_tensor_name`).

    Other tensors keep their module names, which no spec changes. (Their checkpoint key can
    differ: a last pipeline stage saves a tied `output_layer.weight` as the embedding.)
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_selfreward.megatron.checkpoint import unwrap

    names = {}
    for state_key, entry in unwrap(model).sharded_state_dict().items():
        if isinstance(entry, (ShardedTensor, ShardedTensorFactory)) and _MEGATRON_LAYER.fullmatch(state_key):
            names[state_key] = checkpoint_tensor_name(entry)
    return names


def hf_to_megatron_tensor(get_tensor: GetTensor, cfg: Config, name: str) -> torch.Tensor:
    """One full (TP=1) megatron tensor, built from the HF tensors it comes from."""
    m = cfg.model
    rows = padded_vocab_size(m.vocab_size, cfg.parallel.tensor_model_parallel_size)
    if name == EMBEDDING or (name == OUTPUT and m.tie_embeddings):
        return _pad_rows(get_tensor("model.embed_tokens.weight"), rows)
    if name == OUTPUT:
        return _pad_rows(get_tensor("lm_head.weight"), rows)
    if name == FINAL_NORM:
        return get_tensor("model.norm.weight")
    match = _MEGATRON_LAYER.fullmatch(name)
    if match is None:
        raise KeyError(f"no Hugging Face source for megatron tensor {name!r}")
    p, rest = f"model.layers.{match.group(1)}.", match.group(2)
    if rest == _QKV:
        q, k, v = (get_tensor(p + f"self_attn.{x}_proj.weight") for x in "qkv")
        return fuse_qkv(q, k, v, m.num_attention_heads, m.num_query_groups)
    if rest == _FC1:
        return torch.cat([get_tensor(p + "mlp.gate_proj.weight"), get_tensor(p + "mlp.up_proj.weight")])
    for hf, mg in _LAYER_DIRECT.items():
        if rest == mg:
            return get_tensor(p + hf)
    raise KeyError(f"no Hugging Face source for megatron tensor {name!r}")


def hf_to_megatron(
    get_tensor: GetTensor,
    cfg: Config,
    layers: range | None = None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, full TP=1 tensor) for each tensor of the stage, one at a time."""
    for name in megatron_names(cfg, layers, pre_process=pre_process, post_process=post_process):
        yield name, hf_to_megatron_tensor(get_tensor, cfg, name)


def megatron_to_hf(
    get_tensor: GetTensor,
    cfg: Config,
    layers: range | None = None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) from full megatron tensors: QKV/fc1 split, vocab padding stripped."""
    m = cfg.model
    if pre_process:
        yield "model.embed_tokens.weight", get_tensor(EMBEDDING)[: m.vocab_size]
    for i in _layer_range(cfg, layers):
        p, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        yield hp + "input_layernorm.weight", get_tensor(p + _INPUT_NORM)
        q, k, v = split_qkv(get_tensor(p + _QKV), m.num_attention_heads, m.num_query_groups)
        yield hp + "self_attn.q_proj.weight", q
        yield hp + "self_attn.k_proj.weight", k
        yield hp + "self_attn.v_proj.weight", v
        yield hp + "self_attn.o_proj.weight", get_tensor(p + "self_attention.linear_proj.weight")
        yield hp + "post_attention_layernorm.weight", get_tensor(p + _PRE_MLP_NORM)
        gate, up = get_tensor(p + _FC1).chunk(2)
        yield hp + "mlp.gate_proj.weight", gate
        yield hp + "mlp.up_proj.weight", up
        yield hp + "mlp.down_proj.weight", get_tensor(p + "mlp.linear_fc2.weight")
    if post_process:
        yield "model.norm.weight", get_tensor(FINAL_NORM)
        if not m.tie_embeddings:
            yield "lm_head.weight", get_tensor(OUTPUT)[: m.vocab_size]


def megatron_to_hf_tensor(get_tensor: GetTensor, cfg: Config, hf_name: str) -> torch.Tensor:
    """One HF tensor from the megatron tensor(s) it lives in."""
    m = cfg.model
    if hf_name == "model.embed_tokens.weight":
        return get_tensor(EMBEDDING)[: m.vocab_size]
    if hf_name == "lm_head.weight":
        return get_tensor(OUTPUT)[: m.vocab_size]
    if hf_name == "model.norm.weight":
        return get_tensor(FINAL_NORM)
    match = _HF_LAYER.fullmatch(hf_name)
    if match is None:
        raise KeyError(f"no megatron source for Hugging Face tensor {hf_name!r}")
    i = int(match.group(1))
    for name, tensor in megatron_to_hf(get_tensor, cfg, range(i, i + 1), pre_process=False, post_process=False):
        if name == hf_name:
            return tensor
    raise KeyError(f"no megatron source for Hugging Face tensor {hf_name!r}")


# ---------------------------------------------------------------------------------------------
# Tensor parallelism and in-memory loading


def shard_for_tp(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a full megatron tensor, as megatron's parallel layers hold it."""
    if size == 1 or name.endswith(("layernorm.weight", "layer_norm_weight")):
        return full  # norms, plain or fused into a linear, are replicated
    if name.endswith(_FC1):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(size, dim=1)[rank]  # row-parallel: input features split
    # column-parallel (qkv: whole query groups per rank) and vocab-parallel (rows)
    return full.chunk(size, dim=0)[rank]


def check_same_architecture(cfg: Config, hf_config: dict[str, Any], where: str) -> None:
    """Raise (naming `where`) unless `cfg.model` describes the HF checkpoint (max_seq_len may differ)."""
    wanted = config_from_hf(hf_config, where)
    have = dataclasses.asdict(cfg.model)
    wrong = {k: (have[k], v) for k, v in wanted.items() if have[k] != v and k != "max_seq_len"}
    if wrong:
        detail = ", ".join(f"model.{k}={a!r} but the checkpoint has {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(f"{where}: the config does not describe this checkpoint: {detail}")




def load_hf_into_model(model: Any, hf_dir: str | os.PathLike[str], cfg: Config) -> None:
    """Fill this rank's GPTModel chunk (any TP, PP stage) from a HF safetensors directory."""
    from megatron.core import parallel_state

    from megatron_selfreward.convert.hf_checkpoint import HFWeights, read_hf_config
    from megatron_selfreward.megatron.checkpoint import unwrap

    check_same_architecture(cfg, read_hf_config(hf_dir), f"{hf_dir}/config.json")
    weights = HFWeights(hf_dir)
    inner = unwrap(model)
    numbers = [layer.layer_number - 1 for layer in inner.decoder.layers]  # global, 0-based
    first = numbers[0] if numbers else 0
    # Keyed by our spec-independent names: a local-spec and a Transformer Engine model alike.
    names = canonical_names(inner)
    targets: dict[str, tuple[str, torch.Tensor]] = {}  # our name -> (module name, tensor)
    for module_name, tensor in inner.state_dict().items():
        if torch.is_tensor(tensor) and not module_name.endswith("_extra_state"):
            name = names.get(module_name, module_name)
            if name in targets:
                raise KeyError(f"model tensors {targets[name][0]!r} and {module_name!r} both map to {name!r}")
            targets[name] = (module_name, tensor)
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    stream = hf_to_megatron(weights.get, cfg, range(first, first + len(numbers)),
                            pre_process=inner.pre_process, post_process=inner.post_process)
    with torch.no_grad():
        for name, full in stream:
            if name not in targets:
                raise KeyError(f"model chunk has no parameter for {name!r}")
            _, target = targets.pop(name)
            shard = shard_for_tp(name, full, rank, size)
            if shard.shape != target.shape:
                raise ValueError(f"{name}: checkpoint gives {tuple(shard.shape)} for this rank, "
                                 f"model has {tuple(target.shape)}")
            target.copy_(shard)
    if targets:
        raise KeyError(f"{hf_dir}: nothing loaded into {sorted(m for m, _ in targets.values())}")
