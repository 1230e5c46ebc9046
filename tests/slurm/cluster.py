"""A real single-node Slurm cluster on localhost, started and stopped by the tests, and the pieces
it shares with the two-node cluster of multinode.py.

Debian's Slurm 22.05 + munge, no systemd: munged, slurmctld and slurmd are started by hand with a
slurm.conf written into a scratch directory (the client commands find it through SLURM_CONF).
Each setting below answers a gotcha of a one-machine cluster without cgroups: the host name is
not resolvable as a node name (NodeName=localhost, slurmd -N localhost), no cgroup plugins
(proctrack/linuxproc, task/none), and `kill_invalid_depend` so that the dependents of a failed
job are cancelled instead of pending forever (in 22.05 it belongs in DependencyParameters).
The daemons are stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "libpmix2", "openmpi-bin", "libopenmpi-dev"]
MUNGE_RUN = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ensure_installed() -> None:
    """apt-get the daemons if they are missing (what the CI machine starts without)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mpirun")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


def job_env(base: dict[str, str]) -> dict[str, str]:
    """The environment the tests submit with: the stage jobs find this interpreter as `python3`
    on PATH, as they would find a cluster's module-loaded or container Python."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(base, PATH=bin_dir + os.pathsep + base.get("PATH", ""), SELFREWARD_PYTHON=sys.executable,
                PYTHONWARNINGS="ignore")


@dataclass(frozen=True)
class Node:
    name: str
    addr: str
    cpus: int


def slurm_conf(root: Path, *, ctld_addr: str, ctld_port: int, slurmd_port: int, nodes: Sequence[Node],
               extra: str = "") -> str:
    """slurm.conf of a test cluster; per-node daemon files carry the node name (%n). So does TmpFS,
    where the PMIx plugin makes a directory per job step on each node: nodes sharing one /tmp
    would collide, and so would a new cluster's job ids with an old cluster's leftovers."""
    node_lines = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs={n.cpus} State=UNKNOWN" for n in nodes)
    return f"""\
ClusterName=selfreward-ci
SlurmctldHost=localhost({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
TmpFS={root}/tmp-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
DependencyParameters=kill_invalid_depend
ReturnToService=2
MpiDefault=none
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
InactiveLimit=0
KillWait=5
{extra}{node_lines}
PartitionName=debug Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def read_pid(path: Path, timeout_s: float = 20) -> int:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    raise TimeoutError(f"{path} was not written within {timeout_s} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_pid(pid: int, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Daemons:
    """Daemons started by a test cluster, remembered by PID and stopped in reverse order."""

    def __init__(self) -> None:
        self.pids: list[tuple[str, int]] = []

    def spawn(self, name: str, cmd: list[str], pid_file: Path, env: dict[str, str]) -> int:
        subprocess.run(cmd, env=env, check=True, capture_output=True)  # daemonises
        pid = read_pid(pid_file)
        self.pids.append((name, pid))
        return pid

    def start_munge(self, root: Path) -> None:
        """munged for this machine, unless one is already serving it."""
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        if (MUNGE_RUN / "munge.socket.2").exists() and subprocess.run(
                ["munge", "-n"], capture_output=True).returncode == 0:
            return
        if not MUNGE_KEY.is_file():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
        MUNGE_KEY.chmod(0o400)
        pid_file = root / "munged.pid"
        subprocess.run(["munged", "--force", f"--pid-file={pid_file}", f"--log-file={root / 'munged.log'}",
                        f"--seed-file={root / 'munged.seed'}"], check=True, capture_output=True)
        self.pids.append(("munged", read_pid(pid_file)))

    def forget(self, pid: int) -> None:
        self.pids = [(name, p) for name, p in self.pids if p != pid]

    def stop(self) -> None:
        for _, pid in reversed(self.pids):
            stop_pid(pid)
        self.pids.clear()


def node_states(env: dict[str, str]) -> dict[str, str]:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True)
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if len(line.split()) == 2)


def wait_idle(env: dict[str, str], names: Sequence[str], logs: Sequence[Path], timeout_s: float = 60) -> None:
    """Until every node named is idle; the daemons' log tails in the error otherwise."""
    deadline = time.time() + timeout_s
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = node_states(env)
        if all(states.get(name, "").startswith("idle") for name in names):
            return
        time.sleep(0.5)
    tails = "".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.is_file())
    raise TimeoutError(f"Slurm nodes {states} are not all idle after {timeout_s} s:\n{tails}")


class LocalSlurm:
    """`with LocalSlurm(tmp) as cluster:` -> cluster.env has SLURM_CONF for sbatch/squeue/scontrol."""

    def __init__(self, root: Path, cpus: int = 4) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self.daemons = Daemons()

    def start(self) -> "LocalSlurm":
        ensure_installed()
        for sub in ("state", "spool-localhost", "tmp-localhost"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        conf = self.root / "slurm.conf"
        conf.write_text(slurm_conf(self.root, ctld_addr="127.0.0.1", ctld_port=free_port(),
                                   slurmd_port=free_port(), nodes=[Node("localhost", "127.0.0.1", self.cpus)]))
        try:
            self.daemons.start_munge(self.root)
            self.daemons.spawn("slurmctld", ["slurmctld", "-i", "-f", str(conf)], self.root / "slurmctld.pid",
                               self.env)
            self.daemons.spawn("slurmd", ["slurmd", "-N", "localhost", "-f", str(conf)],
                               self.root / "slurmd-localhost.pid", self.env)
            wait_idle(self.env, ["localhost"], [self.root / "slurmctld.log", self.root / "slurmd-localhost.log"])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.daemons.stop()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
