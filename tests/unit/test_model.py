"""The Llama GPTModel builder: published parameter counts, and a real train loop on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_selfreward.config import load_config
from megatron_selfreward.megatron.model import build_model, count_parameters
from megatron_selfreward.megatron.parallel import single_process_world
from megatron_selfreward.megatron.training import build_train_state, causal_batch, train_step
from tests.conftest import CONFIGS

# Published sizes: Llama 2 paper / HF model cards (exact counts of the released checkpoints),
# SmolLM2-135M from its HF checkpoint (tied embeddings counted once).
PUBLISHED = {
    "llama2_70b.yaml": 68_976_648_192,
    "llama2_70b_fp8.yaml": 68_976_648_192,
    "llama2_7b.yaml": 6_738_415_616,
    "smollm2_135m_cpu.yaml": 134_515_008,
}


@pytest.mark.parametrize("preset, expected", sorted(PUBLISHED.items()))
def test_meta_device_parameter_count_matches_published(preset, expected):
    assert count_parameters(load_config(CONFIGS / preset)) == expected


def test_architecture_is_llama():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.hidden_dropout=0.1", "model.rope_theta=50000"])
    with single_process_world():
        model = build_model(cfg)
    names = dict(model.named_parameters())
    assert not any(n.endswith("bias") for n in names), "Llama has no biases"
    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    assert model.config.gated_linear_unit and model.config.activation_func is torch.nn.functional.silu
    fc1 = names["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.shape == (2 * cfg.model.ffn_hidden_size, cfg.model.hidden_size)  # SwiGLU: gate + up
    head_dim = cfg.model.hidden_size // cfg.model.num_attention_heads
    qkv = names["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape[0] == (cfg.model.num_attention_heads + 2 * cfg.model.num_query_groups) * head_dim
    assert model.config.hidden_dropout == 0.1 and model.rotary_pos_emb.inv_freq is not None
    expected_inv = 1.0 / (50000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.float(), expected_inv)


def test_tied_embeddings_share_one_tensor():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.tie_embeddings=true"])
    with single_process_world():
        model = build_model(cfg)
    assert model.output_layer.weight is None
    assert model.shared_embedding_or_output_weight() is model.embedding.word_embeddings.weight


def test_forward_backward_and_optimizer_steps_reduce_loss():
    cfg = load_config(CONFIGS / "tiny.yaml", ["sft.lr=3e-3", "sft.min_lr=3e-3", "sft.warmup_fraction=0"])
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 33))
    with single_process_world():
        state = build_train_state(cfg, cfg.sft, total_steps=8)
        before = {n: p.detach().clone() for n, p in state.model[0].named_parameters()}
        losses = [train_step(state, [causal_batch(tokens[:2]), causal_batch(tokens[2:])])["loss"]
                  for _ in range(8)]
        after = dict(state.model[0].named_parameters())
    assert all(math.isfinite(x) for x in losses)
    # A random model starts near ln(vocab); repeating one batch must be memorised quickly.
    assert abs(losses[0] - math.log(cfg.model.vocab_size)) < 0.5
    assert losses[-1] < losses[0] - 0.5
    assert all(not torch.equal(before[n], after[n].detach()) for n in before), "every param trains"


def test_loss_mask_restricts_loss_to_targets():
    cfg = load_config(CONFIGS / "tiny.yaml")
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 17))
    mask = torch.zeros_like(tokens)
    mask[:, 9:] = 1  # the "response" half
    batch = causal_batch(tokens, mask)
    with single_process_world():
        model = build_model(cfg).eval()
        with torch.no_grad():
            logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                           attention_mask=None)
            per_token = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                              attention_mask=None, labels=batch["labels"])
    by_hand = torch.nn.functional.cross_entropy(logits[0, :, : cfg.model.vocab_size].float(),
                                                batch["labels"][0], reduction="none")
    torch.testing.assert_close(per_token[0].float(), by_hand, atol=1e-5, rtol=1e-5)
    assert batch["loss_mask"].sum() == 8 and batch["loss_mask"][0, :8].sum() == 0


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_meta_build_of_70b_allocates_no_weights():
    import dataclasses

    cfg = load_config(CONFIGS / "llama2_70b.yaml")
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(  # the whole model on this rank
        cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        sequence_parallel=False))
    with single_process_world():
        before = _rss_bytes()
        model = build_model(cfg, meta=True)
        grown = _rss_bytes() - before
    tensors = [*model.parameters(), *model.buffers()]
    assert sum(t.numel() for t in tensors) > 68e9 and all(t.is_meta for t in tensors)
    assert grown < 200 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB"


@pytest.fixture
def te_pretended_usable(monkeypatch):
    """transformer_config and the layer spec as on a GPU node with TE (the spec stays the local
    one: TE itself cannot be imported here)."""
    import megatron_selfreward.megatron.model as model_mod

    monkeypatch.setattr(model_mod, "transformer_engine_status", lambda: (True, ""), raising=False)
    monkeypatch.setattr(model_mod, "transformer_engine_usable", lambda: False)  # layer_spec's


def test_meta_builds_put_te_layers_on_the_meta_device(te_pretended_usable, monkeypatch):
    import megatron.core.extensions.transformer_engine as mte

    from megatron_selfreward.megatron.model import transformer_config

    cfg = load_config(CONFIGS / "llama2_70b.yaml")
    tconf = transformer_config(cfg, for_meta=True)
    # The device megatron hands every TE layer it builds (TE >= 0.12).
    monkeypatch.setattr(mte, "is_te_min_version", lambda *args, **kwargs: True)
    assert mte._get_extra_te_kwargs(tconf)["device"] == "meta"
    # megatron's own layers in that build (embedding, output layer) pass an explicit device.
    with single_process_world():
        model = build_model(load_config(CONFIGS / "tiny.yaml"), meta=True)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_why_transformer_engine_is_not_used_is_logged_and_fp8_fails(monkeypatch, caplog):
    import builtins

    import megatron_selfreward.megatron.model as model_mod
    from megatron_selfreward.config import ConfigError

    real_import = builtins.__import__

    def broken_te(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builtins, "__import__", broken_te)
    model_mod.transformer_engine_status.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=model_mod.__name__):
            assert model_mod.transformer_engine_usable() is False
        assert "RuntimeError: libcudnn.so.9" in caplog.text
        cfg = load_config(CONFIGS / "llama2_70b_fp8.yaml")
        with pytest.raises(ConfigError, match=r"precision\.fp8.*RuntimeError: libcudnn\.so\.9"):
            model_mod.transformer_config(cfg)
    finally:
        model_mod.transformer_engine_status.cache_clear()
