"""The doctor's report: a text table for people, JSON (`--json`) for scripts."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from typing import Any

from megatron_selfreward.doctor.verdict import Check, runnable

WIDTH = 100
LABEL = 20  # width of the component column


def _na(value: Any) -> str:
    return "-" if value in (None, "", []) else str(value)


def _installed(component: dict[str, Any]) -> str:
    if "error" in component:
        return f"could not inspect: {component['error']}"
    if not component.get("installed"):
        return "not installed"
    version = component.get("version") or "(version unknown)"
    if component.get("imports"):
        return f"{version}, imports"
    return f"{version}, does not import: {component.get('import_error')}"


def _environment(facts: dict[str, Any]) -> list[tuple[str, str]]:
    py, t, mc = facts.get("python", {}), facts.get("torch", {}), facts.get("megatron_core", {})
    rows = [("python", f"{_na(py.get('version'))} ({_na(py.get('executable'))}), {_na(py.get('platform'))}")]
    if "error" in t:
        rows.append(("torch", f"could not inspect: {t['error']}"))
    else:
        if not t.get("cuda_build"):
            cuda = "CPU build, no CUDA"
        elif t.get("cuda_available"):
            cuda = f"CUDA {t['cuda_build']}, available"
        else:
            cuda = f"CUDA {t['cuda_build']}, not available ({t.get('cuda_error') or 'no GPU visible'})"
        rows.append(("torch", f"{t.get('version')}; {cuda}"))
        rows.append(("cuDNN / NCCL", f"{_na(t.get('cudnn'))} / {_na(t.get('nccl'))}"))
    gpus = t.get("gpus") or []
    for gpu in gpus:
        major, minor = gpu["capability"]
        rows.append((f"GPU {gpu['index']}", f"{gpu['name']}, {gpu['memory_gib']} GiB, compute capability "
                                           f"{major}.{minor} ({gpu['architecture']}), "
                                           f"{gpu['multiprocessors']} SMs"))
    if not gpus:
        rows.append(("GPUs", "none"))
    if "error" in mc:
        rows.append(("megatron-core", f"could not inspect: {mc['error']}"))
    else:
        span = mc.get("supported", "?")
        state = (f"imports ({mc.get('import_s')} s)" if mc.get("imports")
                 else f"does not import: {mc.get('import_error')}")
        in_range = {True: "", False: ", OUTSIDE the supported range", None: ""}[mc.get("in_range")]
        rows.append(("megatron-core", f"{_na(mc.get('version'))} (supported: {span}{in_range}), {state}"))
    te = facts.get("transformer_engine", {})
    rows.append(("transformer-engine", _installed(te)))
    fp8 = [g for g in gpus if tuple(g["capability"]) >= (8, 9)]
    fp8_text = (f"{len(fp8)} of {len(gpus)} GPU(s) have compute capability >= 8.9" if gpus else "no (no GPU)")
    if te.get("fp8_check"):
        check = te["fp8_check"]
        fp8_text += f"; TE check_fp8_support: {check['supported']} {check['reason']}".rstrip()
    rows.append(("FP8", fp8_text))
    rows.append(("tensorrt-llm", _installed(facts.get("tensorrt_llm", {}))))
    mpi = facts.get("mpi", {})
    problem = mpi.get("error") or mpi.get("probe_error")
    mpi_text = (f"not usable: {problem}" if problem
                else f"mpi4py {mpi.get('mpi4py')}, {mpi.get('library')} (MPI {mpi.get('standard')})")
    rows.append(("mpi", f"{mpi_text}; mpirun: {_na(mpi.get('mpirun'))}"))
    rows.extend(_slurm_rows(facts.get("slurm", {})))
    rows.append(("apex", _installed(facts.get("apex", {}))))
    cpu = facts.get("cpu", {})
    if "error" in cpu:
        rows.append(("cpu", f"could not inspect: {cpu['error']}"))
    else:
        rows.append(("cpu", f"{cpu.get('model')}, {cpu.get('cores_usable')} of {cpu.get('cores_total')} cores "
                            f"usable; flags: {', '.join(cpu.get('bf16_flags') or []) or 'none of note'}; "
                            f"native bf16: {'yes' if cpu.get('native_bf16') else 'no'}"))
        rows.append(("memory", f"{_na(cpu.get('memory_gib'))} GiB, "
                               f"{_na(cpu.get('memory_available_gib'))} GiB available"))
    launcher = facts.get("launcher", {})
    if launcher.get("world_size", 1) > 1:
        rows.append(("launcher", f"{launcher['launcher']}, rank {launcher['rank']} of "
                                 f"{launcher['world_size']}"))
    return rows


def _slurm_rows(sl: dict[str, Any]) -> list[tuple[str, str]]:
    if "error" in sl:
        return [("slurm", f"could not inspect: {sl['error']}")]
    tools = f"srun: {_na(sl.get('srun'))}, sbatch: {_na(sl.get('sbatch'))}"
    if sl.get("srun_version"):
        tools += f"; {sl['srun_version']}"
    elif sl.get("srun_error"):
        tools += f"; srun --version failed: {sl['srun_error']}"
    rows = [("slurm", tools)]
    if sl.get("mpi_plugins"):
        rows.append(("slurm mpi plugins", ", ".join(sl["mpi_plugins"])))
    env = sl.get("env") or {}
    job = " ".join(f"{k}={v}" for k, v in env.items()) if env else "not inside a Slurm job"
    rows.append(("slurm job", job))
    return rows


def _wrap(label: str, text: str, label_width: int = LABEL) -> list[str]:
    first = f"  {label:<{label_width}} "
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=" " * len(first),
                         break_on_hyphens=False, break_long_words=False) or [first]


def render_text(config_label: str, facts: dict[str, Any], checks: list[Check]) -> str:
    lines = [f"selfreward doctor: config {config_label}", "", "Environment"]
    for label, text in _environment(facts):
        lines.extend(_wrap(label, text))
    lines += ["", "What the config needs"]
    for check in checks:
        mark = {"ok": "ok", "warn": "WARN", "block": "BLOCKED"}[check.status]
        label = f"{mark:<7} {check.component:<{LABEL}}"
        lines.extend(_wrap(label, f"{check.feature}: {check.detail}", len(label)))
        if check.fix and check.status != "ok":
            lines.extend(_wrap("", f"-> {check.fix}", len(label)))
    blocks = [c for c in checks if c.status == "block"]
    warns = sum(c.status == "warn" for c in checks)
    lines.append("")
    if blocks:
        lines.append(f"Result: this config cannot run here ({len(blocks)} blocking problem(s), "
                     f"{warns} warning(s)); exit 1")
    else:
        lines.append(f"Result: this config can run here ({warns} warning(s))")
    return "\n".join(lines)


def render_json(config_label: str, facts: dict[str, Any], checks: list[Check]) -> str:
    return json.dumps({"config": config_label, "runnable": runnable(checks), "facts": facts,
                       "checks": [asdict(c) for c in checks]}, indent=2, default=str)
