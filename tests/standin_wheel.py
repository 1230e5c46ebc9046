"""A minimal, valid wheel file standing in for a downloaded one (offline tests of the wheel tools)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def make_wheel(dest: Path, name: str, version: str, tag: str = "cp312-cp312-manylinux_2_28_x86_64", *,
               requires_python: str = ">=3.10", requires: tuple[str, ...] = ()) -> Path:
    """dest/<name>-<version>-<tag>.whl holding one module `<name>_standin` and its dist-info."""
    dest.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}_standin/__init__.py": "",
        f"{info}/METADATA": "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                       f"Requires-Python: {requires_python}",
                                       *[f"Requires-Dist: {r}" for r in requires]]) + "\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: false\nTag: {tag}\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = dest / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path
