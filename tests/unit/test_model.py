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
