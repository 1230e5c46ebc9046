"""What a config needs against what this machine has: a pure function of (config, facts).

`verdict(cfg, facts)` returns one `Check` per feature the config uses: `ok` (enabled), `warn`
(runs, with a cost or a risk) or `block` (cannot run here), each block with what to do. Facts
are the plain data of `facts.collect_facts`; a missing or failed component reads as absent, so
the rules run on fabricated facts in tests and on partial facts after a collector failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from megatron_selfreward.config import tasks_per_node
from megatron_selfreward.precision import NATIVE_BF16_FLAGS, CpuInfo, choose_params_dtype

Status = Literal["ok", "warn", "block"]

FP8_MIN_CAPABILITY = (8, 9)  # Ada and newer have FP8 tensor cores
BF16_MIN_CAPABILITY = (8, 0)  # Ampere and newer have bf16 tensor cores
TE_INSTALL = "pip install -e '.[te]' inside the CUDA environment (README: Optional GPU extras)"
ON_COMPUTE_NODE = "on a cluster, run the doctor on a GPU node: srun -N1 --gpus-per-node=8 selfreward doctor ..."


@dataclass(frozen=True)
class Check:
    component: str  # the package or hardware the feature depends on
    feature: str  # what the config asks for, as key=value where there is one
    status: Status
    detail: str
    fix: str = ""


def runnable(checks: list[Check]) -> bool:
    return not any(check.status == "block" for check in checks)


def _gpus(facts: dict[str, Any]) -> list[dict[str, Any]]:
    torch_facts = facts.get("torch", {})
    return list(torch_facts.get("gpus") or []) if torch_facts.get("cuda_available") else []


def _gpu_text(gpu: dict[str, Any]) -> str:
    major, minor = gpu["capability"]
    return (f"GPU {gpu['index']} ({gpu['name']}, compute capability {major}.{minor}, "
            f"{gpu.get('architecture', '?')})")


def _no_gpu_reason(facts: dict[str, Any]) -> str:
    t = facts.get("torch", {})
    if "error" in t:
        return f"torch could not be inspected ({t['error']})"
    if not t.get("cuda_build"):
        return f"torch {t.get('version', '?')} is a CPU build"
    return f"CUDA is not available ({t.get('cuda_error') or 'no GPU visible'})"


def _te_usable(facts: dict[str, Any]) -> tuple[bool, str]:
    """The rule of megatron/model.py's transformer_engine_status: CUDA and a clean import."""
    te = facts.get("transformer_engine", {})
    if not te.get("imports"):
        reason = te.get("import_error") or te.get("error") or "not inspected"
        return False, ("Transformer Engine is not installed" if reason == "not installed"
                       else f"Transformer Engine does not import ({reason})")
    if not _gpus(facts):
        return False, f"Transformer Engine needs CUDA ({_no_gpu_reason(facts)})"
    return True, f"Transformer Engine {te.get('version') or ''}".rstrip()


def _megatron(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    mc = facts.get("megatron_core", {})
    feature = "every stage (model, training, generation)"
    if not mc.get("imports"):
        reason = mc.get("import_error") or mc.get("error") or "not inspected"
        return [Check("megatron-core", feature, "block", f"megatron-core does not import: {reason}",
                      "pip install megatron-core==0.16.1 (what pyproject.toml pins); if Transformer Engine "
                      "is installed but broken, fix or uninstall it (a TE that fails to import breaks "
                      "`import megatron.core`)")]
    version, supported = mc.get("version"), mc.get("supported", "?")
    if mc.get("in_range") is False:
        # megatron/compat.py refuses it at start-up unless its override variable is set.
        status: Status = "warn" if mc.get("override") else "block"
        return [Check("megatron-core", feature, status,
                      f"megatron-core {version} is outside the supported range megatron-core{supported}"
                      + (" (running anyway: override set)" if status == "warn" else ""),
                      f"pip install 'megatron-core{supported}' (or {mc.get('override_env')}=1 to try "
                      "this release anyway)")]
    return [Check("megatron-core", feature, "ok", f"megatron-core {version} (supported: {supported})")]


def _gpu_cluster(cfg: Any) -> bool:
    """Stages run as Slurm jobs on GPU nodes: this machine may be a login node without GPUs."""
    return cfg.executor.kind == "slurm" and cfg.executor.slurm.gpus_per_node > 0


def _params_dtype(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    prec, gpus = cfg.precision, _gpus(facts)
    dtype, feature = prec.params_dtype, f"precision.params_dtype={prec.params_dtype}"
    if not gpus and _gpu_cluster(cfg) and not prec.dtype_choice:
        return [Check("gpu", feature, "ok", f"{dtype} on the compute nodes' GPUs (bf16 needs compute "
                                            "capability >= 8.0; not checked from here)")]
    if prec.dtype_choice:  # auto: decide again for the machine the facts describe
        cpu = facts.get("cpu", {})
        cpu_info = CpuInfo(cpu.get("model", "?"), frozenset(cpu.get("flags") or ()))
        choice = choose_params_dtype(bool(gpus), cpu_info)
        dtype, feature = choice.params_dtype, "precision.params_dtype=auto"
        reason = choice.reason.removeprefix("auto: ")
        return [Check("cpu" if not gpus else "gpu", feature, "ok", f"{dtype} ({reason})")]
    if gpus:
        old = [g for g in gpus if tuple(g["capability"]) < BF16_MIN_CAPABILITY]
        if dtype == "bfloat16" and old:
            return [Check("gpu", feature, "warn",
                          f"{', '.join(map(_gpu_text, old))}: no bf16 tensor cores (compute capability "
                          "below 8.0), bf16 runs slowly and some fused kernels are missing",
                          "use Ampere or newer GPUs, or precision.params_dtype=float16")]
        return [Check("gpu", feature, "ok", f"{dtype} on {len(gpus)} GPU(s)")]
    cpu = facts.get("cpu", {})
    if dtype == "bfloat16" and not set(NATIVE_BF16_FLAGS) & set(cpu.get("flags") or ()):
        return [Check("cpu", feature, "warn",
                      f"CPU '{cpu.get('model', '?')}' has no native bf16 (no AMX-BF16 or AVX512-BF16): "
                      "works, but bf16 GEMMs run emulated, about 13x slower than fp32",
                      "precision.params_dtype=auto (float32 on this CPU)")]
    if dtype == "float16":
        return [Check("cpu", feature, "warn", "float16 on a CPU works but its GEMMs are emulated (slow)",
                      "precision.params_dtype=auto")]
    return [Check("cpu", feature, "ok", f"{dtype} on CPU '{cpu.get('model', '?')}'")]


def _fp8(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    if not cfg.precision.fp8:
        return []
    feature, gpus, checks = f"precision.fp8={cfg.precision.fp8}", _gpus(facts), []
    fallback = "or unset precision.fp8 (precision.fp8='') to train in BF16"
    if not gpus:
        checks.append(Check("gpu", feature, "block",
                            f"FP8 needs NVIDIA GPUs of compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                            f"this machine has none: {_no_gpu_reason(facts)}",
                            f"run on such GPUs ({ON_COMPUTE_NODE}), {fallback}"))
    old = [g for g in gpus if tuple(g["capability"]) < FP8_MIN_CAPABILITY]
    if old:
        checks.append(Check("gpu", feature, "block",
                            f"{', '.join(map(_gpu_text, old))}: FP8 needs compute capability >= 8.9 "
                            "(Ada, Hopper, Blackwell)", f"run on H100/H200/L40S/B200-class GPUs, {fallback}"))
    te = facts.get("transformer_engine", {})
    if not te.get("imports"):
        _, reason = _te_usable(facts)
        checks.append(Check("transformer-engine", feature, "block",
                            f"FP8 runs through Transformer Engine: {reason}", f"{TE_INSTALL}, {fallback}"))
    elif gpus and not old and (te.get("fp8_check") or {}).get("supported") is False:
        checks.append(Check("transformer-engine", feature, "block",
                            f"Transformer Engine reports FP8 unsupported: {te['fp8_check']['reason']}",
                            f"fix what it names, {fallback}"))
    if not checks:
        checks.append(Check("transformer-engine", feature, "ok",
                            f"Transformer Engine {te.get('version') or ''} with FP8 on {len(gpus)} GPU(s) "
                            f"of compute capability >= 8.9"))
    return checks


def _layer_spec(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    if cfg.precision.fp8:
        return []  # _fp8 requires TE already
    usable, reason = _te_usable(facts)
    if usable:
        return [Check("transformer-engine", "model layer spec", "ok", f"TE layer spec ({reason})")]
    if _gpus(facts):
        return [Check("transformer-engine", "model layer spec", "warn",
                      f"local layer spec on GPU (slower, no fused TE kernels): {reason}", TE_INSTALL)]
    return [Check("transformer-engine", "model layer spec", "ok",
                  "local layer spec (the CPU path; TE not needed)")]


def _engine(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    gen, gpus = cfg.generation, _gpus(facts)
    feature = f"generation.engine={gen.engine}"
    if gen.engine == "trtllm":
        checks = []
        trt = facts.get("tensorrt_llm", {})
        if not trt.get("imports"):
            reason = trt.get("import_error") or trt.get("error") or "not inspected"
            checks.append(Check("tensorrt-llm", feature, "block",
                                f"TensorRT-LLM cannot be imported ({reason})",
                                "install it on a CUDA machine from NVIDIA's index (README: Optional GPU "
                                "extras), or set generation.engine=megatron"))
        if not gpus:
            checks.append(Check("gpu", feature, "block",
                                f"TensorRT-LLM runs on NVIDIA GPUs only: {_no_gpu_reason(facts)}",
                                f"{ON_COMPUTE_NODE}; or set generation.engine=megatron"))
        return checks or [Check("tensorrt-llm", feature, "ok", f"TensorRT-LLM {trt.get('version')}")]
    if gpus:
        return [Check("megatron-core", feature, "ok", "Megatron engine on GPU")]
    cxx = facts.get("cpu", {}).get("cxx")
    kernels = f"generation.cpu_kernels={gen.cpu_kernels}"
    if gen.cpu_kernels == "off":
        return [Check("cpu", feature, "ok", "Megatron engine on CPU, plain torch decode steps")]
    if cxx:
        return [Check("cpu", f"{feature}, {kernels}", "ok",
                      f"Megatron engine on CPU; C++ decode kernels built on first use with {cxx}")]
    status: Status = "block" if gen.cpu_kernels == "on" else "warn"
    return [Check("cpu", f"{feature}, {kernels}", status,
                  "no C++ compiler on PATH: the CPU decode kernels cannot be built"
                  + ("" if status == "block" else " (plain torch decode steps run instead, slower)"),
                  "apt-get install -y g++ (or set CXX), or generation.cpu_kernels=off")]


def _layout(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    p, ex = cfg.parallel, cfg.executor
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    gpus = _gpus(facts)
    if ex.kind == "slurm":
        world = p.world_size or ex.slurm.nodes * tasks_per_node(ex.slurm)
        feature = f"TP {tp} x PP {pp} x DP {world // (tp * pp)} on {ex.slurm.nodes} node(s)"
        if facts.get("slurm", {}).get("env", {}).get("SLURM_JOB_ID") and ex.slurm.gpus_per_node > len(gpus):
            return [Check("gpu", feature, "block",
                          f"executor.slurm.gpus_per_node={ex.slurm.gpus_per_node} but this node of the "
                          f"job sees {len(gpus)} GPU(s)" + ("" if gpus else f": {_no_gpu_reason(facts)}"),
                          "request the GPUs (sbatch/srun --gpus-per-node) or lower "
                          "executor.slurm.gpus_per_node")]
        return [Check("slurm", feature, "ok",
                      f"{world} processes, {ex.slurm.gpus_per_node} GPU(s) per node, on the compute "
                      "nodes (not checked from here)")]
    launched = facts.get("launcher", {}).get("world_size") or 1
    world = p.world_size or (launched if launched > 1 else ex.nproc_per_node)
    feature = f"TP {tp} x PP {pp} x DP {max(world // (tp * pp), 1)}"
    if world < tp * pp or world % (tp * pp):
        return [Check("launcher", feature, "block",
                      f"TP x PP = {tp * pp} needs a multiple of {tp * pp} processes; the local executor "
                      f"starts {world} (executor.nproc_per_node={ex.nproc_per_node})",
                      f"set executor.nproc_per_node={tp * pp} (torchrun on this node), or "
                      "executor.kind=slurm for several nodes")]
    if gpus:
        if world > len(gpus):
            return [Check("gpu", feature, "block",
                          f"one GPU per process: {world} processes, {len(gpus)} GPU(s) here",
                          "lower executor.nproc_per_node and TP/PP, or use executor.kind=slurm")]
        if world > 1 and not facts.get("distributed", {}).get("nccl"):
            return [Check("torch", feature, "block", "several GPU processes need NCCL; this torch has none",
                          "install a CUDA build of torch with NCCL")]
        return [Check("gpu", feature, "ok", f"{world} of {len(gpus)} GPU(s), NCCL")]
    cores = facts.get("cpu", {}).get("cores_usable") or 1
    if world > cores:
        return [Check("cpu", feature, "warn",
                      f"{world} processes on {cores} usable core(s): oversubscribed, slow",
                      "fewer processes (executor.nproc_per_node), or more cores")]
    return [Check("cpu", feature, "ok", f"{world} process(es) on {cores} usable core(s), gloo")]


def _slurm(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    if cfg.executor.kind != "slurm":
        return []
    sl, feature = facts.get("slurm", {}), "executor.kind=slurm"
    if "error" in sl:
        return [Check("slurm", feature, "block", f"Slurm could not be inspected: {sl['error']}",
                      "rerun with --debug; check srun/sbatch by hand")]
    if not sl.get("sbatch"):
        return [Check("slurm", feature, "block", "stages are submitted with sbatch, which is not on PATH",
                      "run from a Slurm login node, or set executor.kind=local")]
    if sl.get("srun_error"):
        return [Check("slurm", feature, "block",
                      f"Slurm is installed but does not answer here: {sl['srun_error']}",
                      "check slurm.conf / SLURM_CONF and that slurmctld is reachable, run from a "
                      "login node, or set executor.kind=local")]
    checks = [Check("slurm", feature, "ok", f"sbatch at {sl['sbatch']} ({sl.get('srun_version') or 'srun'})")]
    plugins, mpi = sl.get("mpi_plugins"), cfg.executor.slurm.mpi
    if plugins and mpi != "none" and mpi not in plugins:
        checks.append(Check("slurm", f"executor.slurm.mpi={mpi}", "warn",
                            f"srun --mpi=list does not name {mpi!r} ({', '.join(plugins)})",
                            "set executor.slurm.mpi to one it lists, or none"))
    return checks


def _mpi(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    comm = cfg.executor.shard_comm
    if comm != "mpi" and facts.get("launcher", {}).get("launcher") != "mpi":
        return []
    feature, mpi = f"executor.shard_comm={comm}", facts.get("mpi", {})
    problem = mpi.get("error") or mpi.get("probe_error")
    if problem or not mpi.get("library"):
        return [Check("mpi", feature, "block",
                      f"sharded generation over MPI needs mpi4py and an MPI library: {problem or 'not found'}",
                      "pip install mpi4py (with an MPI library, e.g. Debian's openmpi-bin), or "
                      "executor.shard_comm=torch")]
    p = cfg.parallel
    if p.tensor_model_parallel_size * p.pipeline_model_parallel_size > 1:
        return [Check("mpi", feature, "block",
                      "MPI workers run one whole model each; TP/PP > 1 needs torch.distributed",
                      "executor.shard_comm=torch (torchrun or srun)")]
    return [Check("mpi", feature, "ok", f"mpi4py {mpi.get('mpi4py')} on {mpi['library']}")]


def _apex(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    apex = facts.get("apex", {})
    if apex.get("imports"):
        return [Check("apex", "fused optimizers and norms", "ok", "NVIDIA apex imports")]
    return [Check("apex", "fused optimizers and norms", "ok",
                  "apex absent: megatron-core runs torch norms and torch.optim (the project keeps "
                  "apex-only fusions off)")]


def _assets(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    checks = []
    for item in facts.get("assets", {}).get("items", []):
        feature = f"{item['key']}={item['value']}"
        if item["found"]:
            checks.append(Check("files", feature, "ok", f"found: {item.get('resolved') or item['value']}"))
        else:
            checks.append(Check("files", feature, "block", item["error"] or "not found",
                                f"point {item['key']} at an existing file or directory on this machine"))
    return checks


RULES = (_megatron, _params_dtype, _fp8, _layer_spec, _engine, _layout, _slurm, _mpi, _apex, _assets)


def verdict(cfg: Any, facts: dict[str, Any]) -> list[Check]:
    """Every feature the config uses, enabled, degraded or blocked by these facts."""
    return [check for rule in RULES for check in rule(cfg, facts)]
