"""Config: presets load, overrides apply with types, and every error names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_selfreward.config import ConfigError, load_config, save_resolved, to_dict
from tests.conftest import CONFIGS

PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_all_design_card_presets_exist():
    for name in ("tiny.yaml", "smollm2_135m_cpu.yaml", "llama2_7b.yaml", "llama2_70b.yaml",
                 "llama2_70b_fp8.yaml"):
        assert name in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / name)
    written = save_resolved(cfg, tmp_path)
    again = load_config(written)
    assert to_dict(again) == to_dict(cfg)


def test_paper_defaults():
    cfg = load_config(None)
    assert cfg.dpo.beta == 0.1
    assert (cfg.sft.lr, cfg.sft.min_lr) == (5.5e-6, 1.1e-6)
    assert (cfg.dpo.lr, cfg.dpo.min_lr) == (1e-6, 1e-7)
    assert cfg.sft.global_batch_size == cfg.dpo.global_batch_size == 16
    assert cfg.generation.responses_per_prompt == 4
    assert (cfg.generation.temperature, cfg.generation.top_p) == (0.7, 0.9)
    assert (cfg.generation.prompts.temperature, cfg.generation.prompts.top_p) == (0.6, 0.9)
    assert cfg.judge.samples_per_response == 3
    assert cfg.sft.save_interval_steps == 200


def test_70b_layout_is_a_realistic_cluster_layout():
    cfg = load_config(CONFIGS / "llama2_70b.yaml")
    p = cfg.parallel
    assert p.tensor_model_parallel_size == 8 and p.pipeline_model_parallel_size >= 2
    assert p.sequence_parallel and p.use_distributed_optimizer
    assert cfg.precision.params_dtype == "bfloat16"
    fp8 = load_config(CONFIGS / "llama2_70b_fp8.yaml")
    assert fp8.precision.fp8 == "hybrid" and fp8.model.num_layers == 80


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["dpo.beta=0.2", "sft.lr=3e-3", "generation.prompts.num_prompts=7",
                                              "parallel.sequence_parallel=false"])
    assert cfg.dpo.beta == 0.2 and isinstance(cfg.dpo.beta, float)
    assert cfg.sft.lr == 3e-3
    assert cfg.generation.prompts.num_prompts == 7


def test_bare_on_off_in_yaml_reach_on_off_choices(tmp_path: Path):
    """YAML 1.1 reads a bare `off` as false: a choice key that offers "on"/"off" still gets them."""
    path = tmp_path / "kernels.yaml"
    path.write_text("base: tiny.yaml\ngeneration:\n  cpu_kernels: off\ntrain:\n  logprob_kernel: off\n")
    (tmp_path / "tiny.yaml").write_text((CONFIGS / "tiny.yaml").read_text())
    cfg = load_config(path)
    assert cfg.generation.cpu_kernels == "off" and cfg.train.logprob_kernel == "off"
    assert load_config(CONFIGS / "tiny.yaml", ["generation.cpu_kernels=on"]).generation.cpu_kernels == "on"
    with pytest.raises(ConfigError, match="generation.cpu_kernels"):
        load_config(CONFIGS / "tiny.yaml", ["generation.cpu_kernels=yes please"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["dpo.betta=0.2"], "dpo.betta"),
        (["dpo.beta=high"], "dpo.beta"),
        (["sft.global_batch_size=1.5"], "sft.global_batch_size"),
        (["parallel.sequence_parallel=yes please"], "parallel.sequence_parallel"),
        (["generation.engine=vllm"], "generation.engine"),
        (["generation.cpu_kernels=fast"], "generation.cpu_kernels"),
        (["model.hidden_size=65"], "model.num_attention_heads"),
        (["parallel.tensor_model_parallel_size=8"], "parallel.tensor_model_parallel_size"),
        (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
        (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size"),
        (["parallel.tensor_model_parallel_size=2", "parallel.world_size=3"], "parallel.world_size"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
        (["parallel.world_size=2", "sft.global_batch_size=3"], "sft.global_batch_size"),
        (["precision.fp8=hybrid"], "precision.fp8"),
        (["dpo.min_lr=1.0"], "dpo.min_lr"),
        (["model.source=hf"], "model.path"),
        (["generation.responses_per_prompt=1"], "generation.responses_per_prompt"),
        (["judge.samples_per_response=0"], "judge.samples_per_response"),
        (["model"], "model"),
    ],
)
def test_invalid_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert key in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'dpo.beta'"):
        load_config(None, ["dpo.betta=0.2"])


def test_yaml_errors_and_unknown_sections_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_slurm_world_size_checked_against_layout():
    with pytest.raises(ConfigError, match="executor.slurm.gpus_per_node"):
        load_config(CONFIGS / "llama2_70b.yaml", ["executor.slurm.gpus_per_node=6"])


def test_base_chain_loop_is_an_error(tmp_path: Path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(a)


def test_fp8_preset_uses_a_recipe_whose_checkpoints_reload():
    assert load_config(CONFIGS / "llama2_70b_fp8.yaml").precision.fp8_recipe == "tensorwise"
    with pytest.raises(ConfigError, match=r"precision\.fp8_recipe.*Transformer Engine >= 2\.18"):
        load_config(CONFIGS / "llama2_70b_fp8.yaml", ["precision.fp8_recipe=delayed"])
    # Without FP8 the recipe is never used.
    assert load_config(CONFIGS / "llama2_70b.yaml", ["precision.fp8_recipe=delayed"]).precision.fp8 == ""
