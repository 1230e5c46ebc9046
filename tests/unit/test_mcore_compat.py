"""The megatron-core version gate: the supported range, and what it says when refusing."""

from __future__ import annotations

import importlib.metadata
import re
import sys

import pytest

from megatron_selfreward.megatron import compat
from tests.conftest import REPO

INSTALL = "pip install 'megatron-core>=0.16.1,<0.20'"


@pytest.fixture(autouse=True)
def fresh_gate(monkeypatch):
    monkeypatch.delenv(compat.OVERRIDE_ENV, raising=False)
    compat.require_megatron_core.cache_clear()
    yield
    compat.require_megatron_core.cache_clear()


def installed(monkeypatch, version: str | None) -> None:
    """Make importlib.metadata report `version` for megatron-core (None: not installed)."""
    real = importlib.metadata.version

    def fake(name: str) -> str:
        if name != "megatron-core":
            return real(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)
    if version is None:  # nor a source checkout on the path
        monkeypatch.setitem(sys.modules, "megatron.core.package_info", None)


@pytest.mark.parametrize("version, ok", [
    ("0.16.0", False), ("0.16.1", True), ("0.17.1", True), ("0.19.2", True),
    ("0.19.2+6a8bbf7", True), ("0.20.0rc1", False), ("0.20.0", False), ("1.0.0", False),
])
def test_supported_range(version, ok):
    assert compat.is_supported(version) is ok


def test_the_pinned_release_is_supported():
    pin = re.search(r'"megatron-core==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert compat.is_supported(pin)


def test_the_installed_release_passes():
    assert compat.require_megatron_core() == importlib.metadata.version("megatron-core")


def test_an_out_of_range_release_is_refused_with_what_to_install(monkeypatch):
    installed(monkeypatch, "0.20.1")
    with pytest.raises(compat.MegatronCoreVersionError) as err:
        compat.require_megatron_core()
    message = str(err.value)
    assert "megatron-core 0.20.1 is installed" in message
    assert "supports megatron-core>=0.16.1,<0.20" in message
    assert INSTALL in message
    assert compat.OVERRIDE_ENV in message


def test_a_missing_megatron_core_is_named(monkeypatch):
    installed(monkeypatch, None)
    with pytest.raises(compat.MegatronCoreVersionError, match="megatron-core is not installed") as err:
        compat.require_megatron_core()
    assert INSTALL in str(err.value)


def test_the_override_runs_an_unsupported_release_with_a_warning(monkeypatch, caplog):
    installed(monkeypatch, "0.21.0")
    monkeypatch.setenv(compat.OVERRIDE_ENV, "1")
    assert compat.require_megatron_core() == "0.21.0"
    assert "megatron-core 0.21.0 is installed" in caplog.text


def test_the_gate_runs_before_megatron_is_used(monkeypatch):
    from megatron_selfreward.config import load_config
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    installed(monkeypatch, "0.15.3")
    with pytest.raises(compat.MegatronCoreVersionError, match="0.15.3"):
        with single_process_world():
            pass
    with pytest.raises(compat.MegatronCoreVersionError, match="0.15.3"):
        build_model(load_config(None), meta=True)
