"""Thread counts from what a process may use: affinity mask, cgroup CPU quota (v1 and v2, the
tightest ancestor), Slurm's --cpus-per-task; shared among the node's processes; one override.
cgroup files are laid out in a temporary /proc + /sys tree, as the kernel shows them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_selfreward import threads
from megatron_selfreward.config import ConfigError, load_config


def _proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(m + "\n" for m in mounts))
    return tmp_path / "proc"



def test_cgroup_v2_quota_is_the_tightest_on_the_way_to_the_root(tmp_path):
    fs = tmp_path / "sys" / "fs" / "cgroup"
    job = fs / "system.slice" / "job.scope"
    job.mkdir(parents=True)
    (fs / "cpu.max").write_text("max 100000\n")
    (fs / "system.slice" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs for the slice
    (job / "cpu.max").write_text("400000 100000\n")  # 4 CPUs for the job, under the slice's 1.5
    proc = _proc(tmp_path, "0::/system.slice/job.scope\n",
                 [f"30 23 0:26 / {fs} rw,nosuid - cgroup2 cgroup2 rw"])
    assert threads.cgroup_cpu_quota(proc) == 1.5


def test_cgroup_v1_quota_from_the_cpu_controller(tmp_path):
    fs = tmp_path / "sys" / "fs" / "cgroup" / "cpu,cpuacct"
    (fs / "docker" / "abc").mkdir(parents=True)
    for directory, quota in ((fs, "-1"), (fs / "docker", "-1"), (fs / "docker" / "abc", "250000")):
        (directory / "cpu.cfs_quota_us").write_text(quota + "\n")
        (directory / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc(tmp_path, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
                 [f"32 31 0:29 / {fs} rw,relatime - cgroup cgroup rw,cpu,cpuacct"])
    assert threads.cgroup_cpu_quota(proc) == 2.5


def test_no_quota_when_unlimited_or_unreadable(tmp_path):
    fs = tmp_path / "cg"
    fs.mkdir()
    (fs / "cpu.max").write_text("max 100000\n")
    proc = _proc(tmp_path, "0::/\n", [f"30 23 0:26 / {fs} rw - cgroup2 cgroup2 rw"])
    assert threads.cgroup_cpu_quota(proc) is None
    assert threads.cgroup_cpu_quota(tmp_path / "nowhere") is None


def test_usable_cpus_takes_the_smallest_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda proc: None)
    assert threads.usable_cpus({}).cpus == 8
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda proc: 2.5)
    budget = threads.usable_cpus({})
    assert (budget.cpus, budget.per_task) == (3, False) and "quota" in budget.why
    # Inside a Slurm step, --cpus-per-task is each task's own.
    budget = threads.usable_cpus({"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "2"})
    assert (budget.cpus, budget.per_task) == (2, True) and "SLURM_CPUS_PER_TASK" in budget.why
    # Outside a step (the batch script itself) the variable describes the steps, not this process.
    assert threads.usable_cpus({"SLURM_CPUS_PER_TASK": "2"}).cpus == 3


@pytest.mark.parametrize("env, want", [
    ({}, 1),
    ({"LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),  # mpirun
    ({"SLURM_STEP_ID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 8),  # srun
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 1),  # not in a step
])
def test_local_processes_from_the_launcher(env, want):
    assert threads.local_processes(env) == want


def test_threads_are_shared_among_the_node_processes_unless_slurm_gave_each_its_own():
    shared = threads.CpuBudget(16, "16 CPUs in the affinity mask")
    assert threads.threads_per_process(0, 4, shared)[0] == 4
    assert threads.threads_per_process(0, 32, shared)[0] == 1
    own = threads.CpuBudget(6, "SLURM_CPUS_PER_TASK=6", per_task=True)
    assert threads.threads_per_process(0, 4, own)[0] == 6
    assert threads.threads_per_process(3, 4, shared) == (3, "executor.cpu_threads=3")


def test_configure_sizes_torch_and_the_children(monkeypatch):
    for key in (*threads.THREAD_COUNT_ENV, *threads.WAIT_POLICY_ENV):
        monkeypatch.delenv(key, raising=False)
    before = torch.get_num_threads()
    try:
        count, why = threads.configure(1)
        assert count == 1 and torch.get_num_threads() == 1 and why == "executor.cpu_threads=1"
        assert all(os.environ[key] == "1" for key in threads.THREAD_COUNT_ENV)
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and threads.threads_choice() == why
    finally:
        torch.set_num_threads(before)


def test_passive_waiting_keeps_what_the_user_set():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.passive_waiting(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "0"}


def test_the_entry_point_asks_for_passive_waiting_before_torch_loads(tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: the CLI sets it first."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from megatron_selfreward.cli import main\n"
            "assert 'torch' not in sys.modules\n"
            "main(['config', '--config', 'tiny'])\n"
            "print('policy', os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_POLICY_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True).stdout
    assert out.strip().endswith("policy PASSIVE")


def test_the_override_is_validated():
    assert load_config(None, ["executor.cpu_threads=3"]).executor.cpu_threads == 3
    with pytest.raises(ConfigError, match="executor.cpu_threads"):
        load_config(None, ["executor.cpu_threads=-1"])
