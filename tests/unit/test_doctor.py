"""selfreward doctor: the facts of this machine, the verdict on fabricated machines, the CLI."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import os
import stat
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from megatron_selfreward.cli import main
from megatron_selfreward.config import load_config
from megatron_selfreward.doctor import facts as doctor_facts
from megatron_selfreward.doctor import collect_facts, render_text, runnable, verdict
from tests.conftest import CONFIGS

COMPONENTS = ("python", "torch", "distributed", "launcher", "megatron_core", "transformer_engine",
              "tensorrt_llm", "mpi", "slurm", "apex", "cpu", "assets")


def preset(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


@pytest.fixture(scope="module")
def here():
    return collect_facts(preset("smollm2_135m_cpu"))


def machine(capability: tuple[int, int] | None = None, *, gpus: int = 1, te: bool = False,
            trtllm: bool = False, cpu_flags: tuple[str, ...] = ("avx2",), sbatch: bool = True) -> dict:
    """Facts of a made-up machine: `gpus` GPUs of `capability` (None: no CUDA)."""
    cuda = capability is not None
    return {
        "torch": {"version": "2.9.0+cu129", "cuda_build": "12.9", "cuda_available": cuda,
                  "gpus": [{"index": i, "name": f"GPU-{capability}", "memory_gib": 80.0,
                            "capability": list(capability), "architecture": "x", "multiprocessors": 132}
                           for i in range(gpus)] if cuda else []},
        "distributed": {"available": True, "nccl": cuda, "gloo": True, "mpi": False},
        "launcher": {"launcher": "single", "world_size": 1, "rank": 0},
        "megatron_core": {"version": "0.16.1", "supported": ">=0.16.1,<0.20", "in_range": True,
                          "imports": True},
        "transformer_engine": {"installed": te, "imports": te, "version": "2.8.0" if te else None,
                               "import_error": None if te else "not installed"},
        "tensorrt_llm": {"installed": trtllm, "imports": trtllm, "version": "1.2.1" if trtllm else None,
                         "import_error": None if trtllm else "not installed"},
        "slurm": {"env": {}, "sbatch": "/usr/bin/sbatch" if sbatch else None, "srun_version": "slurm 24.05",
                  "srun_error": None},
        "cpu": {"model": "Test CPU", "cores_usable": 16, "flags": list(cpu_flags),
                "native_bf16": "amx_bf16" in cpu_flags, "cxx": "/usr/bin/c++"},
        "assets": {"items": []},
    }


def blocks(checks, feature_prefix: str = ""):
    return [c for c in checks if c.status == "block" and c.feature.startswith(feature_prefix)]


# --- facts of this machine ------------------------------------------------------------------


def test_facts_of_this_machine(here):
    assert set(COMPONENTS) <= set(here)
    assert not [name for name in COMPONENTS if "error" in here[name]]  # every collector worked
    assert here["torch"]["version"] == torch.__version__
    assert here["torch"]["cuda_available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert here["torch"]["gpus"] == [] and here["torch"]["cudnn"] is None
    mc = here["megatron_core"]
    assert mc["version"] == importlib.metadata.version("megatron-core")
    assert mc["imports"] and mc["in_range"]
    assert here["cpu"]["cores_usable"] == len(os.sched_getaffinity(0))
    assert here["transformer_engine"]["imports"] is False or torch.cuda.is_available()


def test_a_failing_collector_is_a_reported_reason(monkeypatch):
    def broken():
        raise OSError("no /proc here")

    monkeypatch.setattr(doctor_facts, "collect_cpu", broken)
    facts = collect_facts(preset("tiny"))
    assert facts["cpu"] == {"error": "OSError: no /proc here"}
    checks = verdict(preset("tiny"), facts)  # decides on what it has, without crashing
    assert "cpu                  could not inspect: OSError: no /proc here" in render_text("tiny", facts, checks)


def test_subprocesses_time_out_instead_of_hanging():
    code, _, err = doctor_facts._run(["sleep", "5"], timeout_s=0.2)
    assert code is None and "timed out" in err


def test_slurm_facts_from_srun(tmp_path, monkeypatch):
    srun = tmp_path / "srun"
    srun.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "slurm 22.05.8"; '
                    'else printf "MPI plugin types are...\\n\\tnone\\n\\tpmi2\\n\\tpmix\\n"; fi\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    sl = doctor_facts.collect_slurm({"SLURM_JOB_ID": "7", "HOME": "/root"})
    assert sl["srun_version"] == "slurm 22.05.8" and sl["mpi_plugins"] == ["none", "pmi2", "pmix"]
    assert sl["env"] == {"SLURM_JOB_ID": "7"} and sl["sbatch"] is None


def test_slurm_without_a_controller_blocks_the_slurm_executor(tmp_path, monkeypatch):
    for tool in ("srun", "sbatch"):
        (tmp_path / tool).write_text("#!/bin/sh\necho 'srun: fatal: Could not establish a configuration "
                                     "source' >&2\nexit 1\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    facts = machine((9, 0))
    facts["slurm"] = doctor_facts.collect_slurm({})
    assert facts["slurm"]["srun_error"] == "srun: fatal: Could not establish a configuration source"
    (check,) = blocks(verdict(preset("llama2_7b"), facts))
    assert check.component == "slurm" and "does not answer here" in check.detail


def test_gpu_facts_from_torch_cuda(monkeypatch):
    """The CUDA branch of collect_torch against torch.cuda's API, on a CPU build."""
    props = {0: SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0,
                                multi_processor_count=132)}
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props.__getitem__)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    t = doctor_facts.collect_torch()
    assert (t["cuda_build"], t["nccl"], t["cudnn"]) == ("12.9", "2.27.3", 91002)
    assert t["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0,
                          "capability": [9, 0], "architecture": "Hopper", "multiprocessors": 132}]


def test_te_fp8_check_is_called_when_te_imports_with_cuda(monkeypatch):
    modules = {}
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.fp8"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, modules[name])
    modules["transformer_engine.pytorch.fp8"].check_fp8_support = lambda: (False, "needs CC 8.9")
    te = doctor_facts.collect_transformer_engine(cuda_available=True)
    assert te["installed"] and te["imports"]
    assert te["fp8_check"] == {"supported": False, "reason": "needs CC 8.9"}
    facts = machine((9, 0), te=True)
    facts["transformer_engine"]["fp8_check"] = te["fp8_check"]
    (fp8,) = blocks(verdict(preset("llama2_70b_fp8"), facts), "precision.fp8")
    assert fp8.component == "transformer-engine" and "needs CC 8.9" in fp8.detail


# --- verdict on fabricated machines ---------------------------------------------------------


def test_fp8_on_hopper_without_te_is_blocked_by_te():
    fp8 = blocks(verdict(preset("llama2_70b_fp8"), machine((9, 0), te=False)), "precision.fp8")
    assert [c.component for c in fp8] == ["transformer-engine"]
    assert "Transformer Engine is not installed" in fp8[0].detail and "[te]" in fp8[0].fix


def test_fp8_on_ampere_with_te_is_blocked_by_the_gpu():
    fp8 = blocks(verdict(preset("llama2_70b_fp8"), machine((8, 0), te=True)), "precision.fp8")
    assert [c.component for c in fp8] == ["gpu"]
    assert "GPU-(8, 0)" in fp8[0].detail and "compute capability 8.0" in fp8[0].detail


def test_fp8_on_hopper_with_te_is_enabled():
    checks = verdict(preset("llama2_70b_fp8"), machine((9, 0), te=True))
    assert [c.status for c in checks if c.feature.startswith("precision.fp8")] == ["ok"]


def test_fp8_without_any_gpu_names_both():
    fp8 = blocks(verdict(preset("llama2_70b_fp8"), machine(None)), "precision.fp8")
    assert {c.component for c in fp8} == {"gpu", "transformer-engine"}


def test_trtllm_engine_needs_tensorrt_llm():
    engine = blocks(verdict(preset("llama2_70b"), machine((9, 0), te=True)), "generation.engine")
    assert [c.component for c in engine] == ["tensorrt-llm"]
    assert "generation.engine=megatron" in engine[0].fix
    checks = verdict(preset("llama2_70b"), machine((9, 0), te=True, trtllm=True))
    assert runnable(checks), blocks(checks)


def test_cpu_presets_run_on_a_cpu_machine():
    for name in ("tiny", "smollm2_135m_cpu"):
        checks = verdict(preset(name), machine(None))
        assert runnable(checks), blocks(checks)


def test_bf16_on_a_cpu_without_amx_is_slow_but_works():
    checks = verdict(preset("tiny", "precision.params_dtype=bfloat16"), machine(None))
    (dtype,) = [c for c in checks if c.feature.startswith("precision.params_dtype")]
    assert dtype.status == "warn" and "13x" in dtype.detail
    assert runnable(checks)
    auto = verdict(preset("smollm2_135m_cpu"), machine(None, cpu_flags=("avx2", "amx_bf16")))
    (dtype,) = [c for c in auto if c.feature.startswith("precision.params_dtype")]
    assert dtype.detail.startswith("bfloat16") and "amx_bf16" in dtype.detail


def test_layout_needs_as_many_processes_and_gpus():
    tp2 = preset("tiny", "parallel.tensor_model_parallel_size=2")
    assert [c.component for c in blocks(verdict(tp2, machine(None)))] == ["launcher"]
    two_procs = preset("tiny", "parallel.tensor_model_parallel_size=2", "executor.nproc_per_node=2")
    assert runnable(verdict(two_procs, machine(None)))
    one_gpu = blocks(verdict(two_procs, machine((9, 0), gpus=1)))
    assert [c.component for c in one_gpu] == ["gpu"] and "2 processes, 1 GPU(s)" in one_gpu[0].detail
    assert runnable(verdict(two_procs, machine((9, 0), gpus=2)))


def test_slurm_executor_needs_sbatch():
    (check,) = blocks(verdict(preset("llama2_7b"), machine((9, 0), sbatch=False)))
    assert check.component == "slurm" and "sbatch" in check.detail


def test_unsupported_megatron_core_is_blocked():
    facts = machine(None)
    facts["megatron_core"].update(version="0.12.0", in_range=False, override_env="X_ALLOW")
    (check,) = blocks(verdict(preset("tiny"), facts))
    assert check.component == "megatron-core" and "0.12.0" in check.detail and "X_ALLOW=1" in check.fix


def test_no_facts_at_all_block_without_crashing():
    checks = verdict(preset("tiny"), {})
    assert not runnable(checks) and blocks(checks)[0].component == "megatron-core"


# --- the command ----------------------------------------------------------------------------


def test_cli_default_config_passes_here(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "smollm2_135m_cpu" in out and "this config can run here" in out
    assert f"torch                {torch.__version__}" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's answer")
def test_cli_fp8_preset_fails_here_with_the_reason(capsys):
    assert main(["doctor", "--config", "llama2_70b_fp8"]) == 1
    out = capsys.readouterr().out
    assert "BLOCKED" in out and "precision.fp8=hybrid" in out and "Transformer Engine" in out
    assert "cannot run here" in out


def test_cli_json_parses(capsys):
    assert main(["doctor", "--json", "--config", "tiny"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runnable"] is True and set(COMPONENTS) <= set(report["facts"])
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn"}
    assert report["facts"]["megatron_core"]["version"] == importlib.metadata.version("megatron-core")
