"""What this machine has, as plain data: one collector per component, none of which can crash.

Each collector returns a JSON-ready dict. A collector that raises is reported as
`{"error": "..."}` for its component (see `collect_facts`), so one broken package never hides
the others. Subprocesses (MPI probe, srun) run with timeouts: the doctor must not hang on a
misconfigured Slurm or MPI.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from megatron_selfreward.precision import NATIVE_BF16_FLAGS, read_cpu_info
from megatron_selfreward.threads import usable_cpus

Facts = dict[str, Any]

SUBPROCESS_TIMEOUT_S = 10.0
# The CPU flags that decide bf16 speed (precision.py) and the vector width around them.
CPU_FLAGS_SHOWN = ("avx2", "avx512f", *NATIVE_BF16_FLAGS, "amx_tile")
# The Slurm variables that change how a stage starts: job shape, step identity, GPUs, MPI.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES",
              "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE",
              "SLURM_GPUS_PER_NODE", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID",
              "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_MPI_TYPE", "SLURM_CONF")


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _import_error(module: str) -> str | None:
    """None when `module` imports; else the exception in one line. Any exception counts: an
    installed Transformer Engine fails with RuntimeError on machines without cuDNN."""
    try:
        # Some packages print a banner on import (TensorRT-LLM): keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr):
            importlib.import_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a broken C extension too
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return None


def _run(cmd: list[str], timeout_s: float = SUBPROCESS_TIMEOUT_S) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr); exit code None when it could not start or timed out."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {timeout_s:g} s"
    except OSError as exc:
        return None, "", f"{type(exc).__name__}: {exc}"
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def gpu_architecture(major: int, minor: int) -> str:
    if major == 7:
        return "Volta" if minor < 5 else "Turing"
    if major == 8:
        return "Ada" if minor == 9 else "Ampere"
    if major == 9:
        return "Hopper"
    if major >= 10:
        return "Blackwell"
    return "pre-Volta"


def collect_python() -> Facts:
    return {"version": platform.python_version(), "executable": sys.executable,
            "platform": platform.platform()}


def collect_torch() -> Facts:
    import torch

    facts: Facts = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                    "cuda_available": torch.cuda.is_available(), "cuda_error": None,
                    "cudnn": None, "nccl": None, "gpus": [], "arch_list": [],
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.version.cuda and not facts["cuda_available"]:
        try:
            torch.cuda.init()  # raises with the reason: no driver, no device visible, ...
        except Exception as exc:  # noqa: BLE001
            facts["cuda_error"] = f"{type(exc).__name__}: {exc}"
    if not facts["cuda_available"]:
        return facts
    facts["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        nccl = torch.cuda.nccl.version()
        facts["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as exc:  # noqa: BLE001
        facts["nccl_error"] = f"{type(exc).__name__}: {exc}"
    facts["arch_list"] = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        facts["gpus"].append({"index": index, "name": props.name,
                              "memory_gib": round(props.total_memory / 2**30, 1),
                              "capability": [props.major, props.minor],
                              "architecture": gpu_architecture(props.major, props.minor),
                              "multiprocessors": props.multi_processor_count})
    return facts


def collect_distributed() -> Facts:
    import torch.distributed as dist

    if not dist.is_available():
        return {"available": False}
    return {"available": True, "nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available(),
            "mpi": dist.is_mpi_available()}


def collect_launcher(environ: Mapping[str, str] | None = None) -> Facts:
    """The launcher that started this process (torchrun, srun, mpirun) and its world size."""
    from megatron_selfreward.megatron.parallel import read_dist_env

    env = read_dist_env(os.environ if environ is None else environ)
    return {"launcher": env.launcher, "world_size": env.world_size, "rank": env.rank}


def collect_megatron_core() -> Facts:
    """Version against the supported range of megatron/compat.py (the gate every entry point
    passes), whether `import megatron.core` succeeds, and how long it takes."""
    from megatron_selfreward.megatron import compat

    facts: Facts = {"version": None, "supported": compat.SUPPORTED, "in_range": None,
                    "override_env": compat.OVERRIDE_ENV, "override": os.environ.get(compat.OVERRIDE_ENV) == "1",
                    "imports": False, "import_error": None, "import_s": None}
    if importlib.util.find_spec("megatron") is None:
        facts["import_error"] = "not installed"
        return facts
    start = time.perf_counter()
    facts["import_error"] = _import_error("megatron.core")
    facts["import_s"] = round(time.perf_counter() - start, 1)
    facts["imports"] = facts["import_error"] is None
    version = facts["version"] = compat.installed_version()
    if version:
        try:
            facts["in_range"] = compat.is_supported(version)
        except ValueError:  # not a release number: leave unknown
            pass
    return facts


def collect_transformer_engine(cuda_available: bool) -> Facts:
    """Installed, imports (why not), and TE's own FP8 check where it can run (TE + CUDA)."""
    version = _dist_version("transformer-engine", "transformer_engine", "transformer-engine-cu12",
                            "transformer-engine-cu13")
    installed = version is not None or importlib.util.find_spec("transformer_engine") is not None
    facts: Facts = {"version": version, "installed": installed, "imports": False,
                    "import_error": None if installed else "not installed", "fp8_check": None}
    if not installed:
        return facts
    facts["import_error"] = _import_error("transformer_engine.pytorch")
    facts["imports"] = facts["import_error"] is None
    if facts["imports"] and cuda_available:
        try:
            from transformer_engine.pytorch.fp8 import check_fp8_support

            supported, reason = check_fp8_support()
            facts["fp8_check"] = {"supported": bool(supported), "reason": str(reason or "")}
        except Exception as exc:  # noqa: BLE001 - moved or renamed in some TE release
            facts["fp8_check"] = {"supported": None, "reason": f"{type(exc).__name__}: {exc}"}
    return facts


def collect_tensorrt_llm() -> Facts:
    version = _dist_version("tensorrt-llm", "tensorrt_llm")
    installed = version is not None or importlib.util.find_spec("tensorrt_llm") is not None
    error = _import_error("tensorrt_llm") if installed else "not installed"
    return {"version": version, "installed": installed, "imports": error is None, "import_error": error}


# Run apart from this process: mpi4py initialises MPI when mpi4py.MPI is imported, which must
# not happen to the doctor's own process; the version queries are valid before MPI_Init.
_MPI_PROBE = """
import json, mpi4py
mpi4py.rc.initialize = mpi4py.rc.finalize = False
from mpi4py import MPI
print(json.dumps({"mpi4py": mpi4py.__version__, "standard": "%d.%d" % MPI.Get_version(),
                  "library": MPI.Get_library_version().replace("\\0", "").strip()}))
"""


def collect_mpi() -> Facts:
    facts: Facts = {"mpi4py": _dist_version("mpi4py"), "standard": None, "library": None,
                    "probe_error": None, "mpirun": shutil.which("mpirun")}
    if facts["mpi4py"] is None and importlib.util.find_spec("mpi4py") is None:
        facts["probe_error"] = "mpi4py not installed"
        return facts
    code, out, err = _run([sys.executable, "-c", _MPI_PROBE])
    if code != 0:
        facts["probe_error"] = _last_line(err) or f"the mpi4py probe exited {code}"
        return facts
    try:
        probe = json.loads(out.splitlines()[-1])
    except (ValueError, IndexError):
        facts["probe_error"] = f"unreadable mpi4py probe output: {out[:200]!r}"
        return facts
    library = probe["library"].splitlines()[0] if probe["library"] else ""
    facts.update(mpi4py=probe["mpi4py"], standard=probe["standard"],
                 library=library.split(",")[0].strip() or None, library_full=library)
    return facts


def collect_slurm(environ: Mapping[str, str] | None = None) -> Facts:
    env = os.environ if environ is None else environ
    facts: Facts = {"env": {k: env[k] for k in SLURM_VARS if k in env},
                    "srun": shutil.which("srun"), "sbatch": shutil.which("sbatch"),
                    "srun_version": None, "srun_error": None, "mpi_plugins": None}
    if not facts["srun"]:
        return facts
    # `srun --version` reads the Slurm configuration first: it fails where none is reachable.
    code, out, err = _run([facts["srun"], "--version"])
    if code != 0:
        facts["srun_error"] = _last_line(err) or _last_line(out) or f"srun --version exited {code}"
        return facts
    facts["srun_version"] = (out or err).splitlines()[0] if (out or err) else "srun (version not printed)"
    code, out, err = _run([facts["srun"], "--mpi=list"])
    if code == 0:
        # "MPI plugin types are..." then one name per line (22.05: "\tpmix", older: "srun: pmix").
        names = [line.split(":")[-1].strip().removeprefix("mpi/")
                 for line in (out + "\n" + err).splitlines()[1:]]
        facts["mpi_plugins"] = sorted({n for n in names if n and " " not in n})
    return facts


def collect_apex() -> Facts:
    if importlib.util.find_spec("apex") is None:
        return {"installed": False, "imports": False, "import_error": "not installed"}
    # NVIDIA apex has apex.normalization; the unrelated PyPI package `apex` does not.
    error = _import_error("apex.normalization")
    return {"installed": True, "imports": error is None, "import_error": error,
            "version": _dist_version("apex")}


def _meminfo_gib(path: Path = Path("/proc/meminfo")) -> dict[str, float]:
    sizes = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            sizes[key] = round(int(value.split()[0]) / 2**20, 1)  # kB
    return sizes


def collect_cpu() -> Facts:
    info = read_cpu_info()
    budget = usable_cpus()  # what the thread pools are sized from: affinity, cgroup quota, Slurm
    try:
        memory = _meminfo_gib()
    except (OSError, ValueError):
        memory = {}
    return {"model": info.model, "cores_usable": budget.cpus, "cores_usable_why": budget.why,
            "cores_total": os.cpu_count(),
            "bf16_flags": [f for f in CPU_FLAGS_SHOWN if f in info.flags],
            "native_bf16": any(f in info.flags for f in NATIVE_BF16_FLAGS),
            "flags": sorted(info.flags),
            "memory_gib": memory.get("MemTotal"), "memory_available_gib": memory.get("MemAvailable"),
            "cxx": os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")}


def collect_assets(cfg: Any) -> Facts:
    """Whether the files the config names exist: the base model, a seed directory, an export."""
    from megatron_selfreward.assets import resolve_model_path

    items = []
    if cfg.model.source != "random":
        item = {"key": "model.path", "value": cfg.model.path, "found": True, "error": None}
        try:
            item["resolved"] = str(resolve_model_path(cfg.model.path))
        except Exception as exc:  # noqa: BLE001 - ConfigError / FileNotFoundError with the fix
            item.update(found=False, error=str(exc))
        items.append(item)
    for key, value in (("data.seed", cfg.data.seed), ("data.oasst_export", cfg.data.oasst_export)):
        if value and value != "builtin":
            found = Path(value).expanduser().exists()
            items.append({"key": key, "value": value, "found": found,
                          "error": None if found else f"config key '{key}': {value} does not exist"})
    return {"items": items}


def _guarded(collector: Callable[[], Facts]) -> Facts:
    try:
        return collector()
    except Exception as exc:  # noqa: BLE001 - a broken component is a finding, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"}


def collect_facts(cfg: Any) -> Facts:
    """Every component's facts. Order matters once: megatron.core is imported before Transformer
    Engine, whose failed import must not be what breaks megatron.core's."""
    facts: Facts = {"python": _guarded(collect_python), "torch": _guarded(collect_torch)}
    cuda = bool(facts["torch"].get("cuda_available"))
    facts["distributed"] = _guarded(collect_distributed)
    facts["launcher"] = _guarded(collect_launcher)
    facts["megatron_core"] = _guarded(collect_megatron_core)
    facts["transformer_engine"] = _guarded(lambda: collect_transformer_engine(cuda))
    facts["tensorrt_llm"] = _guarded(collect_tensorrt_llm)
    facts["mpi"] = _guarded(collect_mpi)
    facts["slurm"] = _guarded(collect_slurm)
    facts["apex"] = _guarded(collect_apex)
    facts["cpu"] = _guarded(collect_cpu)
    facts["assets"] = _guarded(lambda: collect_assets(cfg))
    return facts
