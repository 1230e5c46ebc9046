"""Naming and toolchain set-up shared by the C++ extensions this project compiles on first use.

torch's extension builder caches a build under TORCH_EXTENSIONS_DIR by name only: a name that
hashes everything the binary depends on (source, flags, torch version, and whatever else the
caller passes) makes a stale build impossible to load and lets builds for different machines
share one cache directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil


def extension_name(prefix: str, *parts: bytes) -> str:
    """`prefix` plus a short hash of `parts` (each a byte string the build depends on)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return f"{prefix}_{digest.hexdigest()[:12]}"


def ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; a venv that was not activated has the PyPI
    ninja's binary off PATH, so put it there."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
