"""A two-node Slurm cluster on one machine: each node a Linux network namespace with its own
address, host name and /etc/hosts, all started and torn down by the tests.

Topology: a bridge in the root namespace carries slurmctld's address; node k is a namespace
with a veth into the bridge (eth0 there, address .1k of a private /24 that no interface of this
machine uses) and no route beyond that subnet, so every packet stays between the fixture's
namespaces. Each slurmd runs inside its node's namespace and also in a UTS and mount namespace
of its own (nsenter --net, then unshare --uts --mount): host name `nodeK` and an /etc/hosts
that resolves every node name to its address. Everything a job starts inherits these, so a job
on node2 sees a machine called node2 that can reach node1 by name, as on a real cluster where
the rendezvous address is the first host of SLURM_JOB_NODELIST. (`ip netns exec` is not used:
it remounts /sys, and slurmd then finds no /sys/fs/cgroup.) munged and slurmctld run in the root
namespace; munge's socket is a file, reachable from every namespace.

Teardown, also after a failed start: every process inside the node namespaces (slurmd, the
slurmstepds and job tasks it started), then slurmctld and munged by PID, then the namespaces,
the veths and the bridge.
"""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.slurm.cluster import Daemons, Node, alive, ensure_installed, free_port, node_states, read_pid, \
    slurm_conf, wait_idle

# A node that stops answering is DOWN after this many seconds (the default, 300, is for real
# networks), and its jobs end NODE_FAIL. Batch jobs on it are not requeued: the test of a
# failed node wants the stage to fail and its dependents cancelled.
FAILURE_CONF = "SlurmdTimeout=5\nJobRequeue=0\n"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.234.0.0/16 that no interface or route of this machine uses."""
    used = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    nets = [ipaddress.ip_network(word, strict=False) for word in used.split() if "/" in word and word[0].isdigit()]
    candidates = list(ipaddress.ip_network("10.234.0.0/16").subnets(new_prefix=24))
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(other) for other in nets):
            return net
    raise RuntimeError("no free /24 in 10.234.0.0/16 for the test cluster's bridge")


class MultiNodeSlurm:
    """`with MultiNodeSlurm(tmp) as cluster:` -> nodes node1..nodeN; cluster.env for the clients."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2) -> None:
        self.root = Path(root)
        self.tag = f"{random.randrange(16 ** 4):04x}"
        self.bridge = f"srb{self.tag}"
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.ctld_addr = str(hosts[0])
        self.nodes = [Node(f"node{k}", str(hosts[9 + k]), cpus_per_node) for k in range(1, nodes + 1)]
        self.conf = self.root / "slurm.conf"
        self.hosts_file = self.root / "hosts"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons = Daemons()
        self._namespaces: list[str] = []
        self._bridge_up = False

    def netns(self, node: str) -> str:
        return f"sr{self.tag}{node}"

    # -- start -----------------------------------------------------------------------------

    def start(self) -> "MultiNodeSlurm":
        ensure_installed()
        try:
            self._network()
            (self.root / "state").mkdir(parents=True, exist_ok=True)
            for node in self.nodes:
                (self.root / f"spool-{node.name}").mkdir(exist_ok=True)
                (self.root / f"tmp-{node.name}").mkdir(exist_ok=True)
            self.hosts_file.write_text("127.0.0.1 localhost\n" + f"{self.ctld_addr} slurmctld\n" +
                                       "".join(f"{n.addr} {n.name}\n" for n in self.nodes))
            self.conf.write_text(slurm_conf(self.root, ctld_addr=self.ctld_addr, ctld_port=free_port(self.ctld_addr),
                                            slurmd_port=free_port(), nodes=self.nodes, extra=FAILURE_CONF))
            self.daemons.start_munge(self.root)
            self.daemons.spawn("slurmctld", ["slurmctld", "-i", "-f", str(self.conf)], self.root / "slurmctld.pid",
                               self.env)
            for node in self.nodes:
                self.start_slurmd(node.name)
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_up = True
        _ip("addr", "add", f"{self.ctld_addr}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for k, node in enumerate(self.nodes, start=1):
            ns, veth = self.netns(node.name), f"srv{self.tag}{k}"
            _ip("netns", "add", ns)
            self._namespaces.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{node.addr}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def start_slurmd(self, node: str) -> int:
        """slurmd of `node` inside its namespaces (after `crash`, this brings the node back)."""
        inner = 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1" -f "$3"'
        cmd = ["nsenter", f"--net=/run/netns/{self.netns(node)}", "--", "unshare", "--uts", "--mount",
               "--propagation", "private", "--", "sh", "-c", inner, "sh", node, str(self.hosts_file), str(self.conf)]
        pid_file = self.root / f"slurmd-{node}.pid"
        pid_file.unlink(missing_ok=True)
        return self.daemons.spawn(f"slurmd {node}", cmd, pid_file, self.env)

    def wait_idle(self, timeout_s: float = 60) -> None:
        logs = [self.root / "slurmctld.log", *(self.root / f"slurmd-{n.name}.log" for n in self.nodes)]
        wait_idle(self.env, [n.name for n in self.nodes], logs, timeout_s)

    # -- failure ---------------------------------------------------------------------------

    def pids_in(self, node: str) -> list[int]:
        """Every process in `node`'s network namespace: its slurmd and what that started."""
        proc = _ip("netns", "pids", self.netns(node), check=False)
        return [int(p) for p in proc.stdout.split()]

    def crash(self, node: str) -> None:
        """The node dies at once: SIGKILL to its slurmd, slurmstepds and job processes."""
        pid_file = self.root / f"slurmd-{node}.pid"
        if pid_file.is_file():
            self.daemons.forget(read_pid(pid_file))
        self._kill_all(node)

    def wait_state(self, node: str, prefix: str, timeout_s: float = 60) -> str:
        """Until sinfo shows `node` in a state starting with `prefix` (e.g. "down")."""
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            state = node_states(self.env).get(node, "")
            if state.startswith(prefix):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"{node} is {state!r}, not {prefix}*, after {timeout_s} s")

    def _kill_all(self, node: str) -> None:
        for _ in range(50):  # a dying slurmstepd may still fork: until the namespace is empty
            pids = self.pids_in(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"processes left in {self.netns(node)}: {[p for p in self.pids_in(node) if alive(p)]}")

    # -- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        errors = []
        for ns in self._namespaces:
            node = ns[len(f"sr{self.tag}"):]
            try:
                # slurmd by PID first (it tells slurmctld nothing useful now, but ends cleanly)
                for name, pid in list(self.daemons.pids):
                    if name == f"slurmd {node}":
                        self.daemons.forget(pid)
                        os.kill(pid, signal.SIGTERM)
                time.sleep(0.2)
                self._kill_all(node)
            except (OSError, RuntimeError) as err:
                errors.append(err)
        self.daemons.stop()
        for ns in self._namespaces:
            _ip("netns", "del", ns, check=False)  # its eth0 goes with it, and so the veth's other end
        self._namespaces.clear()
        if self._bridge_up:
            _ip("link", "del", self.bridge, check=False)
            self._bridge_up = False
        if errors:
            raise RuntimeError(f"test cluster teardown: {errors}")

    def __enter__(self) -> "MultiNodeSlurm":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
