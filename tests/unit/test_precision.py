"""`precision.params_dtype: auto`: bf16 where the machine computes it natively, fp32 elsewhere;
decided on each machine that loads the config, recorded with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_selfreward import precision
from megatron_selfreward.config import load_config, save_resolved
from megatron_selfreward.pipeline.schedule import plan
from megatron_selfreward.precision import CpuInfo, choose_params_dtype, read_cpu_info
from tests.conftest import CONFIGS

# /proc/cpuinfo excerpts of the two CPUs machines of this kind come with.
INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AMD_ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni
"""
CPU_PRESET = CONFIGS / "smollm2_135m_cpu.yaml"


def _cpu(tmp_path: Path, text: str) -> CpuInfo:
    path = tmp_path / "cpuinfo"
    path.write_text(text + "\n" + text.replace("processor\t: 0", "processor\t: 1"))
    return read_cpu_info(path)


@pytest.fixture()
def machine(monkeypatch, tmp_path):
    """Make this machine look like one of the two CPU kinds (no CUDA)."""
    def fake(text: str) -> None:
        monkeypatch.setattr(precision, "read_cpu_info", lambda: _cpu(tmp_path, text))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return fake


def test_cpuinfo_is_read_from_the_first_processor(tmp_path):
    cpu = _cpu(tmp_path, INTEL_AMX)
    assert cpu.model == "Intel(R) Xeon(R) Processor"
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= cpu.flags
    assert read_cpu_info(tmp_path / "absent").flags == frozenset()


@pytest.mark.parametrize("flags, cuda, expected", [
    ({"avx2", "amx_bf16"}, False, "bfloat16"),
    ({"avx2", "avx512f", "avx512_bf16"}, False, "bfloat16"),
    ({"avx2", "avx512f"}, False, "float32"),  # AVX-512 without its bf16 extension
    ({"avx2"}, False, "float32"),
    (set(), False, "float32"),  # flags unreadable: not known to be fast
    ({"avx2"}, True, "bfloat16"),  # the GPU computes, whatever the host CPU
])
def test_choice_follows_native_bf16(flags, cuda, expected):
    choice = choose_params_dtype(cuda, CpuInfo("some cpu", frozenset(flags)))
    assert choice.params_dtype == expected
    assert choice.reason.startswith("auto: ")


def test_cpu_preset_defaults_to_auto_and_resolves_per_cpu_kind(machine, tmp_path):
    machine(AMD_ZEN2)
    amd = load_config(CPU_PRESET)
    assert amd.precision.params_dtype == "float32"
    assert "no native bf16" in amd.precision.dtype_choice and "AMD EPYC" in amd.precision.dtype_choice
    machine(INTEL_AMX)
    intel = load_config(CPU_PRESET)
    assert intel.precision.params_dtype == "bfloat16"
    assert "amx_bf16" in intel.precision.dtype_choice


def test_run_config_keeps_auto_and_decides_again_on_the_next_machine(machine, tmp_path):
    machine(INTEL_AMX)
    written = save_resolved(load_config(CPU_PRESET), tmp_path)
    assert "params_dtype: auto" in written.read_text()
    machine(AMD_ZEN2)
    assert load_config(written).precision.params_dtype == "float32"


def test_explicit_dtype_is_kept_and_says_so(machine, tmp_path):
    machine(AMD_ZEN2)
    cfg = load_config(CPU_PRESET, ["precision.params_dtype=bfloat16"])
    assert (cfg.precision.params_dtype, cfg.precision.dtype_choice) == ("bfloat16", "")
    assert "params_dtype: bfloat16" in save_resolved(cfg, tmp_path).read_text()
    assert precision.describe(cfg) == "bfloat16 (set in the config)"


def test_dtype_is_part_of_every_model_stage_fingerprint(machine, tmp_path):
    """Moving a run directory to the other CPU kind reruns what the dtype changes, nothing else."""
    run = [f"pipeline.run_dir={tmp_path}"]
    machine(AMD_ZEN2)
    amd = {(s.name, s.iteration): s.params for s in plan(load_config(CPU_PRESET, run))}
    machine(INTEL_AMX)
    intel = {(s.name, s.iteration): s.params for s in plan(load_config(CPU_PRESET, run))}
    changed = {name for (name, _), params in amd.items() if params != intel[(name, _)]}
    assert changed == {"build_eft", "train_sft", "evaluate", "generate_prompts", "sample_responses",
                       "judge_responses", "train_dpo"}
