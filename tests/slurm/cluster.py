"""A real single-node Slurm cluster on localhost, started and stopped by the tests.

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
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "libpmix2", "openmpi-bin", "libopenmpi-dev"]
MUNGE_RUN = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
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


def _conf(root: Path, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    return f"""\
ClusterName=selfreward-ci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """`with LocalSlurm(tmp) as cluster:` -> cluster.env has SLURM_CONF for sbatch/squeue/scontrol."""

    def __init__(self, root: Path, cpus: int = 4) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self._pids: list[tuple[str, int]] = []

    def start(self) -> "LocalSlurm":
        ensure_installed()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "slurm.conf").write_text(_conf(self.root, _free_port(), _free_port(), self.cpus))
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-i", "-f", str(self.root / "slurm.conf")],
                    self.root / "slurmctld.pid")
        self._spawn("slurmd", ["slurmd", "-N", "localhost", "-f", str(self.root / "slurm.conf")],
                    self.root / "slurmd.pid")
        self._wait_idle()
        return self

    def _start_munge(self) -> None:
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        if (MUNGE_RUN / "munge.socket.2").exists() and subprocess.run(
                ["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving this machine
        if not MUNGE_KEY.is_file():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
        MUNGE_KEY.chmod(0o400)
        pid_file = self.root / "munged.pid"
        subprocess.run(["munged", "--force", f"--pid-file={pid_file}", f"--log-file={self.root / 'munged.log'}",
                        f"--seed-file={self.root / 'munged.seed'}"], check=True, capture_output=True)
        self._pids.append(("munged", int(self._read_pid(pid_file))))

    @staticmethod
    def _read_pid(path: Path, timeout_s: float = 20) -> int:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                return int(path.read_text().strip())
            except (FileNotFoundError, ValueError):
                time.sleep(0.1)
        raise TimeoutError(f"{path} was not written within {timeout_s} s")

    def _spawn(self, name: str, cmd: list[str], pid_file: Path) -> None:
        subprocess.run(cmd, env=self.env, check=True, capture_output=True)  # daemonises
        self._pids.append((name, self._read_pid(pid_file)))

    def _wait_idle(self, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            state = proc.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        logs = "".join((self.root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                       if (self.root / f).is_file())
        raise TimeoutError(f"the Slurm node is {state!r}, not idle, after {timeout_s} s:\n{logs}")

    def stop(self) -> None:
        for name, pid in reversed(self._pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        self._pids.clear()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
