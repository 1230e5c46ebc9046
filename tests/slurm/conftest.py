"""Fixtures of the Slurm tests: the two-node cluster (multinode.py), and the `multinode` marker."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.slurm.multinode import MultiNodeSlurm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multinode: a Slurm cluster of two nodes on this machine "
                                       "(network namespaces; needs root and apt)")


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """slurmctld + munged here, node1 and node2 each a network namespace with its own slurmd."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and the Slurm daemons need root")
    if shutil.which("ip") is None or shutil.which("nsenter") is None or shutil.which("unshare") is None:
        pytest.skip("needs iproute2 (ip) and util-linux (nsenter, unshare)")
    with MultiNodeSlurm(tmp_path_factory.mktemp("slurm2")) as cluster:
        yield cluster
