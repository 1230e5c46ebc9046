"""The Llama family as a Megatron-Core GPTModel.

RMSNorm, SwiGLU, RoPE (configurable theta), grouped-query attention, optional tied embeddings,
no biases, configurable dropout. The Transformer Engine layer spec is used when TE imports
cleanly and CUDA is present; the local (pure megatron.core) spec otherwise. This file knows
nothing about how the model is distributed beyond what TransformerConfig carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from megatron_selfreward.config import Config, ConfigError

_log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@functools.cache
def transformer_engine_status() -> tuple[bool, str]:
    """(usable, why not): TE counts as present only if CUDA is there *and* it imports cleanly.

    An installed TE can fail in many ways (on CPU machines a RuntimeError, cudnn missing; on GPU
    nodes a CUDA or torch version mismatch): any exception means "absent", and the reason is
    logged once, since the local layer spec then trains silently slower and without FP8.
    """
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - see docstring
        reason = f"importing transformer_engine.pytorch raised {type(exc).__name__}: {exc}"
        _log.warning("Transformer Engine is not used (the local layer spec runs instead): %s", reason)
        return False, reason
    return True, ""


def transformer_engine_usable() -> bool:
    return transformer_engine_status()[0]


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """The embedding is split over TP ranks by rows, so its row count must divide evenly."""
    return -(-vocab_size // tensor_parallel_size) * tensor_parallel_size


def transformer_config(cfg: Config, *, for_meta: bool = False) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p, prec = cfg.model, cfg.parallel, cfg.precision
    dtype = torch_dtype(prec.params_dtype)
    on_gpu = torch.cuda.is_available()
    # Meta-device builds (parameter counting, planning) never run a GEMM: no TE needed.
    fp8 = None if for_meta else (prec.fp8 or None)
    te_usable, te_reason = transformer_engine_status()
    if fp8 and not te_usable:
        raise ConfigError(
            f"config key 'precision.fp8': FP8 needs Transformer Engine, which is not usable here "
            f"({te_reason}; it needs CUDA and `pip install megatron-selfreward[te]`); unset "
            "precision.fp8 to train in BF16."
        )
    if for_meta:
        # Never allocate weights. TE layers get an explicit device from megatron
        # (`_get_extra_te_kwargs` in megatron.core.extensions.transformer_engine): "cpu" under
        # use_cpu_initialization (real host memory, ~140 GB for 70B), "meta" under
        # init_model_with_meta_device. megatron's local layers allocate on the default device
        # (meta in build_model) only under use_cpu_initialization, else on current_device().
        cpu_init, meta_init = not te_usable, True
    else:
        # Host-side init splits one full master weight per layer: identical weights for any TP.
        cpu_init, meta_init = not on_gpu, False
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        fp8=fp8,
        fp8_recipe=prec.fp8_recipe,
        use_cpu_initialization=cpu_init,
        init_model_with_meta_device=meta_init,
        perform_initialization=not for_meta,
        # These fusions need apex / TE kernels; megatron.core has no CPU fallback for them.
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's constructor, usable under sequence parallelism.

    megatron.core's own torch-norm wrapper refuses sequence parallelism. Under SP each TP rank
    normalises a slice of the sequence, so the weight's grad is a partial sum: flagging the weight
    `sequence_parallel` makes megatron all-reduce it over the TP group (as TE's norms do).
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True


def layer_spec(cfg: Config, tconf: Any) -> Any:
    """The decoder block spec: TE layers when usable, megatron's local layers with our norm otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if transformer_engine_usable():
        return specs.get_gpt_layer_with_transformer_engine_spec()
    local = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = dataclasses.replace(
        local,
        submodules=dataclasses.replace(
            local.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm
        ),
    )
    block = TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tconf), layer_norm=RMSNorm
    )
    return ModuleSpec(module=TransformerBlock, submodules=block)


class _ExplicitDevicesToMeta(TorchFunctionMode):
    """Sends tensors created with an explicit `device=` to the meta device: megatron's local
    layers pass `torch.cuda.current_device()` unless use_cpu_initialization, RoPE passes "cpu"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=torch.device("meta"))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _all_on_meta():
    """Every tensor a model build creates on the meta device, with or without `device=`."""
    with torch.device("meta"), _ExplicitDevicesToMeta():
        yield


def build_model(
    cfg: Config,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    meta: bool = False,
) -> Any:
    """Build this rank's GPTModel chunk (the whole model at PP=1).

    `meta=True` builds on the meta device, without allocating or initialising weights, for
    parameter counting and memory planning; it needs no process group.
    """
    from megatron_selfreward.megatron.compat import require_megatron_core

    require_megatron_core()
    from megatron.core import parallel_state

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage() if not meta else True
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage() if not meta else True
    tconf = transformer_config(cfg, for_meta=meta)
    ctx = _all_on_meta() if meta else contextlib.nullcontext()
    with ctx:
        model = _llama_class()(
            config=tconf,
            transformer_layer_spec=layer_spec(cfg, tconf),
            vocab_size=padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tensor_model_parallel_size),
            max_sequence_length=cfg.model.max_seq_len,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rope_theta,
            parallel_output=True,
        )
    model.logprob_kernel = cfg.train.logprob_kernel
    return model


# ---------------------------------------------------------------------------------------------
# The output layer on target positions only


@functools.cache
def _llama_class() -> type:
    """GPTModel whose loss path computes logits only where the loss mask is set (built lazily:
    megatron is imported on first use only)."""
    from megatron.core.models.gpt import GPTModel

    class LlamaGPTModel(GPTModel):
        """megatron's GPTModel; `forward(..., labels=, loss_mask=)` returns the per-token loss [b, s]
        computed at the positions where `loss_mask` is set (zero elsewhere).

        Prompt, role-header and padding positions carry no loss in SFT or DPO, yet the plain path
        projects every one of them onto the whole vocabulary (the largest GEMM of a small model and
        a [tokens, vocab] fp32 cross entropy). The unmasked positions' losses were multiplied by
        zero, so the loss and every gradient are unchanged.
        """

        logprob_kernel = "off"

        def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None,
                         inference_context=None, **kwargs):
            plain = (labels is None or loss_mask is None or not self.post_process
                     or self.config.mtp_num_layers is not None
                     or (inference_context is not None and not self.training))
            if plain:
                return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args,
                                            loss_mask=loss_mask, inference_context=inference_context,
                                            **kwargs)
            return target_token_nll(self, hidden_states, labels, loss_mask)

    return LlamaGPTModel


def target_token_nll(model: Any, hidden_states: torch.Tensor, labels: torch.Tensor,
                     loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood [b, s] of `labels`, computed where `loss_mask` != 0.

    hidden_states: the final norm's output [s, b, h] (under sequence parallelism this rank's
    [s/tp, b, h] slice). The selected positions go through megatron's output layer and
    vocab-parallel cross entropy (any TP), or, with `train.logprob_kernel`, through the chunked
    log-prob kernel in kernels/logprobs.py (TP = 1: it needs the whole vocabulary).
    """
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    layer = model.output_layer
    if layer.sequence_parallel:
        # Every TP rank needs every selected position: gather the sequence first. The output
        # layer (sequence parallelism off below) then all-reduces the input grad over TP, so the
        # gather's backward only keeps this rank's slice.
        hidden_states = gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False, group=layer.tp_group)
    s, b, h = hidden_states.shape
    where = loss_mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1)  # [n] in [s, b] order
    selected = hidden_states.reshape(s * b, h).index_select(0, where)
    targets = labels.transpose(0, 1).reshape(-1).index_select(0, where)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else layer.weight
    if model.logprob_kernel != "off":
        from megatron_selfreward.kernels.logprobs import logprobs

        nll = -logprobs(selected, weight, targets, impl=model.logprob_kernel)
    else:
        restore, layer.sequence_parallel = layer.sequence_parallel, False
        try:
            logits, _ = layer(selected.unsqueeze(1), weight=weight)
        finally:
            layer.sequence_parallel = restore
        nll = model.compute_language_model_loss(targets.unsqueeze(0), logits).reshape(-1)
    out = torch.zeros(s * b, dtype=nll.dtype, device=nll.device).index_put((where,), nll)
    return out.view(s, b).transpose(0, 1)


def count_parameters(cfg: Config) -> int:
    """Unique parameters of the whole model at TP=1/PP=1 (tied embeddings counted once)."""
    single = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(
            cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
            sequence_parallel=False,
        ),
    )
    from megatron_selfreward.megatron.parallel import single_process_world

    with single_process_world():
        model = build_model(single, meta=True)
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total
