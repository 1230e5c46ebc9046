"""The megatron-core releases this package runs on, checked before our code first imports megatron.

`pyproject.toml` pins megatron-core 0.16.1: the newest release pip installs on Python 3.11
(0.17 and newer declare Requires-Python >= 3.12), and what CPU installs and CI run. GPU clusters
run the megatron-core their NGC container ships, which may be newer: any release in `SUPPORTED`
works. Its ends are the releases that the megatron internals behind `internals.py` were read
and tested against (tests/integration/test_mcore_latest.py runs conversions under the newest).

(`cpu_compat.py` is a different thing: the CUDA -> CPU redirects for machines without a GPU.)
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import re

__all__ = ["SUPPORTED", "MegatronCoreVersionError", "installed_version", "is_supported",
           "require_megatron_core"]

_log = logging.getLogger(__name__)

# The one declaration of the supported range (pip specifier syntax, lower bound inclusive).
SUPPORTED = ">=0.16.1,<0.20"
INSTALL = f"pip install 'megatron-core{SUPPORTED}'"
# Set to 1 to run an unsupported release anyway (a warning instead of the error), e.g. to try
# a new NGC container before the range is widened.
OVERRIDE_ENV = "SELFREWARD_ALLOW_ANY_MEGATRON_CORE"


class MegatronCoreVersionError(ImportError):
    """megatron-core is missing, or its version is outside `SUPPORTED`."""


def _release(version: str) -> tuple[int, ...]:
    """'0.19.2' -> (0, 19, 2); pre-release and local tags ('0.20.0rc1', '0.19.0+nv') count as
    their release numbers."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def _bounds() -> tuple[tuple[int, ...], tuple[int, ...]]:
    low, high = SUPPORTED.split(",")
    assert low.startswith(">=") and high.startswith("<"), SUPPORTED
    return _release(low[2:]), _release(high[1:])


def is_supported(version: str) -> bool:
    low, high = _bounds()
    return low <= _release(version) < high


def installed_version() -> str | None:
    """The installed megatron-core's version, or None when it is absent.

    The distribution's metadata answers without importing megatron (about 6 s); a source
    checkout on PYTHONPATH has no metadata, and its package_info module answers instead.
    """
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        package_info = importlib.import_module("megatron.core.package_info")
    except ImportError:
        return None
    return str(package_info.__version__)


@functools.cache
def require_megatron_core() -> str:
    """Check once per process that a supported megatron-core is installed; returns its version."""
    version = installed_version()
    if version is None:
        raise MegatronCoreVersionError(
            f"megatron-core is not installed; megatron-selfreward needs megatron-core{SUPPORTED}: "
            f"{INSTALL} (Python 3.11 and CPU installs: megatron-core==0.16.1, as pyproject.toml pins)"
        )
    if is_supported(version):
        return version
    message = (f"megatron-core {version} is installed; megatron-selfreward supports "
               f"megatron-core{SUPPORTED}: {INSTALL}")
    if os.environ.get(OVERRIDE_ENV) == "1":
        _log.warning("%s (running anyway: %s=1)", message, OVERRIDE_ENV)
        return version
    raise MegatronCoreVersionError(f"{message} (or set {OVERRIDE_ENV}=1 to try this release anyway)")
