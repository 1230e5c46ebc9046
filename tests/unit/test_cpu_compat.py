"""The CPU compatibility layer: every redirect is still needed, and with them megatron runs.

If a megatron-core upgrade removes a CUDA call, the "raw" probe for it starts passing and the
first test fails: drop that redirect. If an upgrade adds CUDA calls on our path, the "patched"
probes or the training / parallel / checkpoint tests fail: add a redirect with its reason.
"""

from __future__ import annotations

import json
import sys

import megatron.core
import pytest
import torch

from tests.conftest import run_python

# The megatron-core releases the redirects were verified against (a supported pip install on
# Python 3.11 resolves 0.16.1; 0.17+ requires Python 3.12).
VERIFIED_MEGATRON_CORE = {"0.16.1"}


def _probe(mode: str) -> dict[str, str]:
    out = run_python(["tests/cpu_compat_probe.py", mode], timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def raw():
    return _probe("raw")


def test_megatron_core_version_is_one_the_redirects_were_verified_against():
    assert megatron.core.__version__ in VERIFIED_MEGATRON_CORE, (
        f"megatron-core {megatron.core.__version__} is not verified: run tests/cpu_compat_probe.py "
        "raw|patched, review megatron_selfreward/megatron/cpu_compat.py, then add the version here"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirects exist for machines without CUDA")
def test_every_redirect_is_still_needed(raw):
    not_needed = [name for name, result in raw.items() if result == "ok"]
    assert not not_needed, f"megatron-core/torch no longer needs these redirects: {not_needed}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirects exist for machines without CUDA")
def test_every_probe_passes_with_the_redirects():
    patched = _probe("patched")
    failing = {name: result for name, result in patched.items() if result != "ok"}
    assert not failing, failing


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirects exist for machines without CUDA")
def test_type_remap_is_what_makes_the_distributed_optimizer_build():
    result = _probe("patched_without_type_remap")["distributed_optimizer_type_check"]
    assert "torch.cuda.FloatTensor" in result


def test_our_own_code_sees_true_tensor_types():
    from megatron_selfreward.megatron import cpu_compat

    cpu_compat.apply()
    assert torch.ones(2).type() == ("torch.cuda.FloatTensor" if torch.cuda.is_available()
                                    else "torch.FloatTensor")
    assert sys.modules["megatron_selfreward.megatron.cpu_compat"].cuda_absent() == (
        not torch.cuda.is_available())
