"""A layer spec with Transformer Engine's *names* and megatron's local modules (TE cannot run here).

megatron-core's TE spec (`get_gpt_layer_with_transformer_engine_spec`) fuses each pre-norm into the
linear after it: `TELayerNormColumnParallelLinear` owns `layer_norm_weight` and normalises its
input before the GEMM, `input_layernorm` / `pre_mlp_layernorm` are `IdentityOp`, and the layer
needs no `sharded_state_dict_keys_map` since its names already are the checkpoint names. This
spec reproduces that on CPU: module and state-dict names are TE's
(`decoder.layers.N.self_attention.linear_qkv.layer_norm_weight`), and `sharded_state_dict` puts
the fused weight under `<prefix>layer_norm_weight`, replicated over TP (the base
`ColumnParallelLinear.sharded_state_dict` TP-shards only `weight` and `bias`, as TE's does).

Use it by replacing `megatron_selfreward.megatron.model.layer_spec` (same signature), e.g.
`monkeypatch.setattr(model, "layer_spec", te_named_layer_spec)`; `build_model` and everything
built on it (conversion's meta layout included) then uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear


class FusedRMSNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm + column-parallel linear in one module, named like TE's LayerNormColumnParallelLinear."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        if config.sequence_parallel:
            # Each TP rank normalises its slice of the sequence: a partial grad, all-reduced by megatron.
            self.layer_norm_weight.sequence_parallel = True

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        normed = F.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(normed, weight=weight, runtime_gather_output=runtime_gather_output)


def te_named_layer_spec(cfg: Any, tconf: Any) -> Any:
    """Drop-in for `megatron_selfreward.megatron.model.layer_spec`: the TE spec's names and shape."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_selfreward.megatron.model import RMSNorm

    local = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = local.submodules
    attention = dataclasses.replace(
        sub.self_attention,
        submodules=dataclasses.replace(sub.self_attention.submodules,
                                       linear_qkv=FusedRMSNormColumnParallelLinear))
    mlp = dataclasses.replace(
        sub.mlp, submodules=dataclasses.replace(sub.mlp.submodules,
                                                linear_fc1=FusedRMSNormColumnParallelLinear))
    layer = dataclasses.replace(local, submodules=dataclasses.replace(
        sub, input_layernorm=IdentityOp, self_attention=attention, pre_mlp_layernorm=IdentityOp,
        mlp=mlp, sharded_state_dict_keys_map={}))
    block = TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tconf), layer_norm=RMSNorm)
    return ModuleSpec(module=TransformerBlock, submodules=block)
