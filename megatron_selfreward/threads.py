"""How many CPU threads this process may use, and every thread pool sized from that.

`os.cpu_count()` is the machine's count, not what a process may run on. Shared login nodes,
CPU partitions, containers with a CPU quota and Slurm's `--cpus-per-task` all give a process
less: its CPU affinity mask (`sched_getaffinity`), its cgroup's CPU quota (cgroup v2 `cpu.max`,
v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, the tightest on the way to the root) and, inside a
Slurm step, `SLURM_CPUS_PER_TASK`. `usable_cpus()` is the smallest of these.

`configure(cfg, local_processes)` then sizes, for this process and the processes it starts:
torch's intra-op pool (its OpenMP team, which our C++ decode kernels use through
`at::parallel_for`), torch's inter-op pool, and the OpenMP/MKL variables children read at
start. `executor.cpu_threads` overrides the count (0 = usable CPUs / processes on this node).

No busy-waiting: OpenMP threads that finish a parallel region spin for a while before they
sleep (libgomp: `GOMP_SPINCOUNT`, 300,000 iterations by default; Intel's runtime:
`KMP_BLOCKTIME`, 200 ms). On a machine whose cores are shared, a spinning thread takes the core
from the thread the team waits for. `OMP_WAIT_POLICY=PASSIVE` makes them sleep at once; it is
set by `passive_waiting()`, which must run before torch is imported (libgomp reads it when it
loads), as `selfreward`'s entry point does. A value the user set is kept.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

__all__ = ["CpuBudget", "cgroup_cpu_quota", "configure", "local_processes", "passive_waiting",
           "threads_choice", "threads_per_process", "usable_cpus"]

OVERRIDE_KEY = "executor.cpu_threads"
WAIT_POLICY_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
THREAD_COUNT_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_chosen: list[str] = []  # why this process runs the threads it runs (set by configure)


@dataclass(frozen=True)
class CpuBudget:
    cpus: int
    why: str  # which limit decided it, in words
    per_task: bool = False  # Slurm gave each task its own CPUs: not shared by the node's tasks


def passive_waiting(environ: dict[str, str] | None = None) -> None:
    """OpenMP threads sleep as soon as they wait (see the module doc); the user's values win."""
    env = os.environ if environ is None else environ
    for key, value in WAIT_POLICY_ENV.items():
        env.setdefault(key, value)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_mounts(proc: Path) -> list[tuple[str, Path, str]]:
    """(filesystem type, mount point, root within the hierarchy) of each cgroup mount, with the
    controllers of a v1 mount appended to its type ("cgroup:cpu,cpuacct")."""
    mounts = []
    for line in (_read(proc / "self" / "mountinfo") or "").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        fstype = after[0]
        if fstype == "cgroup2":
            mounts.append(("cgroup2", Path(fields[4]), fields[3]))
        elif fstype == "cgroup" and len(after) >= 3:
            options = after[2].split(",")
            mounts.append(("cgroup:" + ",".join(options), Path(fields[4]), fields[3]))
    return mounts


def _ancestors(mount: Path, mount_root: str, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory under `mount` and each parent up to the mount point."""
    relative = os.path.relpath(cgroup_path, mount_root) if cgroup_path.startswith(mount_root) else cgroup_path
    parts = [p for p in Path(relative.lstrip("/")).parts if p not in (".", "")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_v2(directory: Path) -> float | None:
    fields = (_read(directory / "cpu.max") or "").split()  # "<quota> <period>" or "max <period>"
    if len(fields) != 2 or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1])


def _quota_v1(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def cgroup_cpu_quota(proc: Path = Path("/proc")) -> float | None:
    """CPUs' worth of time per period this process's cgroups allow (the tightest of its own and
    its ancestors'); None when unlimited or unknown."""
    memberships = {}
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        memberships[controllers] = path
    limits = []
    for fstype, mount, mount_root in _cgroup_mounts(proc):
        if fstype == "cgroup2" and "" in memberships:
            limits += [_quota_v2(d) for d in _ancestors(mount, mount_root, memberships[""])]
        elif fstype.startswith("cgroup:") and "cpu" in fstype[len("cgroup:"):].split(","):
            path = next((p for c, p in memberships.items() if "cpu" in c.split(",")), None)
            if path is not None:
                limits += [_quota_v1(d) for d in _ancestors(mount, mount_root, path)]
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def usable_cpus(environ: Mapping[str, str] | None = None, proc: Path = Path("/proc")) -> CpuBudget:
    """The CPUs this process may use: affinity mask, cgroup quota, Slurm's --cpus-per-task."""
    env = os.environ if environ is None else environ
    try:
        affinity = len(os.sched_getaffinity(0))
        budget = CpuBudget(affinity, f"{affinity} CPUs in the affinity mask")
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
        budget = CpuBudget(count, f"{count} CPUs (no affinity mask on this OS)")
    quota = cgroup_cpu_quota(proc)
    if quota is not None and math.ceil(quota) < budget.cpus:
        budget = CpuBudget(max(1, math.ceil(quota)), f"cgroup CPU quota of {quota:g} CPUs")
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if env.get("SLURM_STEP_ID") is not None and per_task.isdigit() and 0 < int(per_task) < budget.cpus:
        budget = CpuBudget(int(per_task), f"SLURM_CPUS_PER_TASK={per_task}", per_task=True)
    return budget


def local_processes(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this node, as the launcher says (torchrun, srun, mpirun); 1
    when started plainly."""
    env = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
    if env.get("SLURM_STEP_ID") is not None and tasks.isdigit():
        return max(1, int(tasks))
    return 1


def threads_per_process(override: int, local_processes: int = 1,
                        budget: CpuBudget | None = None) -> tuple[int, str]:
    """(threads, why) for each of `local_processes` processes of this node."""
    if override > 0:
        return override, f"{OVERRIDE_KEY}={override}"
    budget = budget or usable_cpus()
    if budget.per_task or local_processes <= 1:
        return budget.cpus, budget.why
    return max(1, budget.cpus // local_processes), f"{budget.why}, shared by {local_processes} processes"


def configure(override: int, processes: int | None = None) -> tuple[int, str]:
    """Size this process's torch pools and its children's OpenMP teams; returns (threads, why).

    `processes`: this job's processes on this node (default: what the launcher says). The
    OpenMP variables are not read: torchrun sets OMP_NUM_THREADS=1 in every worker it starts,
    so `executor.cpu_threads` is the one override. torch's inter-op pool can be sized only
    before its first use; when that has passed, it is left as it is (it runs independent ops
    of a graph, which this project's code does not launch).
    """
    import torch

    threads, why = threads_per_process(override, processes or local_processes())
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already in use: see the docstring
    for key in THREAD_COUNT_ENV:  # for the processes this one starts (they size their own too)
        os.environ[key] = str(threads)
    passive_waiting()
    _chosen[:] = [why]
    return threads, why


def threads_choice() -> str:
    """Why this process runs its thread count (for manifests); torch's default if unset."""
    return _chosen[0] if _chosen else "torch's default (threads.configure not called)"
