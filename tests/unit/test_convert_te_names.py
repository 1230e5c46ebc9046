"""Conversion with the Transformer Engine layer spec's names (fused norms), proven on CPU.

TE cannot run here, so tests/te_named_spec.py builds a model with TE's module and state-dict
names from megatron's local modules. The converters key tensors on megatron's spec-independent
distributed-checkpoint names, so HF weights must load into that model as into the local-spec one
(same logits as transformers), HF -> Megatron -> HF must round-trip with its layout, and a
checkpoint written with the local spec must load into it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from megatron_selfreward.convert.hf_megatron import (  # noqa: E402
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)
from megatron_selfreward.convert.llama_map import load_hf_into_model, shard_for_tp  # noqa: E402
from megatron_selfreward.megatron import model as model_module  # noqa: E402
from megatron_selfreward.megatron.checkpoint import MODEL_PREFIX, load_model  # noqa: E402
from megatron_selfreward.megatron.model import build_model  # noqa: E402
from megatron_selfreward.megatron.parallel import single_process_world  # noqa: E402
from tests.te_named_spec import te_named_layer_spec  # noqa: E402
from tests.unit.test_convert_llama import (  # noqa: E402,F401 - fixtures shared with those tests
    hf_dir,
    hf_logits,
    megatron_logits,
    read_tensors,
    tiny_cfg,
    tokens,
)


@pytest.fixture
def te_named(monkeypatch):
    """Every model built from here on (the converters' meta layout too) has TE's names."""
    monkeypatch.setattr(model_module, "layer_spec", te_named_layer_spec)


def test_the_stand_in_has_te_names(hf_dir, te_named):
    with single_process_world():
        names = set(build_model(tiny_cfg(hf_dir)).state_dict())
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in names
    assert not [n for n in names if "input_layernorm" in n or "pre_mlp_layernorm" in n]


def test_hf_loads_into_te_named_model_as_into_local_spec(hf_dir, tokens, monkeypatch):
    cfg = tiny_cfg(hf_dir)
    with single_process_world():
        local = build_model(cfg)
        load_hf_into_model(local, hf_dir, cfg)
        local_logits = megatron_logits(local, tokens)
        monkeypatch.setattr(model_module, "layer_spec", te_named_layer_spec)
        te = build_model(cfg)
        load_hf_into_model(te, hf_dir, cfg)
        te_logits = megatron_logits(te, tokens)
    torch.testing.assert_close(te_logits, local_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(te_logits, hf_logits(hf_dir, tokens), atol=1e-4, rtol=0)


def test_fused_norms_are_replicated_over_tp():
    norm = torch.arange(8.0)
    for name in ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"):
        assert torch.equal(shard_for_tp(name, norm, 1, 2), norm)


def test_te_named_model_with_an_unloaded_parameter_fails_naming_it(hf_dir, te_named):
    cfg = tiny_cfg(hf_dir)
    with single_process_world():
        model = build_model(cfg)
        fc1 = model.decoder.layers[1].mlp.linear_fc1
        fc1.register_parameter("stray", torch.nn.Parameter(torch.ones(2)))
        stray = r"nothing loaded into \['decoder\.layers\.1\.mlp\.linear_fc1\.stray'\]"
        with pytest.raises(KeyError, match=stray):
            load_hf_into_model(model, hf_dir, cfg)


def test_sharded_state_dict_keys_are_spec_independent(hf_dir, monkeypatch):
    """What the converters rely on: both specs save the same tensors under the same keys."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    def checkpoint_entries(model):
        entries = set()
        for entry in nested_values(model.sharded_state_dict(prefix=MODEL_PREFIX)):
            shards = nested_values(entry.build()) if isinstance(entry, ShardedTensorFactory) else [entry]
            for shard in shards:
                entries.add((type(shard).__name__, shard.key, tuple(shard.global_offset),
                             tuple(getattr(shard, "global_shape", ()))))
        return entries

    cfg = tiny_cfg(hf_dir)
    with single_process_world():
        local = checkpoint_entries(build_model(cfg))
        monkeypatch.setattr(model_module, "layer_spec", te_named_layer_spec)
        te = checkpoint_entries(build_model(cfg))
    assert te == local
    assert ("ShardedTensor", "model.decoder.layers.mlp.linear_fc1.layer_norm_weight", (1, 0), (2, 64)) in te


@pytest.mark.usefixtures("process_world")
def test_conversion_round_trips_with_te_named_layout(hf_dir, tmp_path, monkeypatch):
    """HF -> Megatron -> HF with the TE-named layout, and back from a local-spec checkpoint."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    local_written = convert_hf_to_megatron(hf_dir, tmp_path / "local")
    monkeypatch.setattr(model_module, "layer_spec", te_named_layer_spec)
    te_written = convert_hf_to_megatron(hf_dir, tmp_path / "te")
    assert load_tensors_metadata(str(te_written)).keys() == load_tensors_metadata(str(local_written)).keys()
    original = read_tensors(hf_dir)
    for ckpt in (te_written, local_written):
        returned = read_tensors(convert_megatron_to_hf(ckpt, tmp_path / f"{ckpt.name}_hf"))
        assert original.keys() == returned.keys()
        assert all(torch.equal(original[k], returned[k]) for k in original), ckpt.name


@pytest.mark.usefixtures("process_world")
def test_local_spec_checkpoint_loads_into_te_named_model(hf_dir, tokens, tmp_path, monkeypatch):
    from megatron_selfreward.config import load_config

    megatron_dir = convert_hf_to_megatron(hf_dir, tmp_path / "megatron")  # local spec's layout
    cfg = load_config(megatron_dir / "model_config.yaml")
    monkeypatch.setattr(model_module, "layer_spec", te_named_layer_spec)
    with single_process_world():
        model = build_model(cfg)
        load_model(model, megatron_dir)
        norm = model.decoder.layers[1].mlp.linear_fc1.layer_norm_weight
        expected = read_tensors(hf_dir)["model.layers.1.post_attention_layernorm.weight"]
        assert torch.equal(norm.detach(), expected)
        ours = megatron_logits(model, tokens)
    torch.testing.assert_close(ours, hf_logits(hf_dir, tokens), atol=1e-4, rtol=0)
