"""Wheels that `gpu_check.sh` carries to the lent GPU machine, which has no network.

That machine's image has Python 3.12 with torch 2.11 (CUDA 13), triton, transformers,
tokenizers, sentencepiece, safetensors, pyyaml, psutil, tqdm, numpy, tensorboard and the rest of
what the benchmark imports, except megatron-core. (Established by recording every third-party
top-level module a CPU run of all of gpu_bench.py's parts imports, and comparing it with the
image's package list: gguf, mistral-common and TRL are not on that path.) So the list is one
wheel: megatron-core at the version pyproject.toml pins. Its wheels are CPython-specific
(`cp312-cp312-manylinux_2_24/2_28_x86_64`: one C++ helper for megatron's data sets, unused
here), so they are fetched for the target interpreter, not this one.

    python benchmarks/gpu_wheels.py prepare [--dest .gpu-wheels]   # download (idempotent), verify
    python benchmarks/gpu_wheels.py verify  [--dest .gpu-wheels]   # tags, Requires-Python, deps, size
    python benchmarks/gpu_wheels.py install --target DIR [--for-target-python]   # offline pip install

`install` runs pip offline from the folder (`--no-index --no-deps`) into DIR, never touching the
interpreter's own packages (torch stays the image's); put DIR on PYTHONPATH. With
`--for-target-python` pip selects wheels for the GPU machine's interpreter instead of the running
one (what the CPU dry run does to prove the folder installs there).

Only needs the standard library, pip and `packaging` (both machines have them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / ".gpu-wheels"
CARRIED = ("megatron-core",)

# The GPU machine's interpreter and what its image already holds (versions where known) that
# the carried wheels require.
TARGET_PYTHON = "3.12.3"
TARGET_GLIBC_MINOR = 39  # manylinux_2_N tags pip may pick there (Ubuntu 24.04: glibc 2.39)
IMAGE_HAS: dict[str, str | None] = {"torch": "2.11.0", "numpy": "2.5.2", "packaging": None}
# Every call may carry 64 MiB in all: the working tree plus the wheels.
CARRY_BUDGET_BYTES = 64 * 2**20


def pinned_versions(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """`name==version` dependencies of pyproject.toml, by canonical name."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        req = Requirement(dep)
        spec = list(req.specifier)
        if len(spec) == 1 and spec[0].operator == "==":
            pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def target_platforms() -> list[str]:
    return ([f"manylinux_2_{n}_x86_64" for n in range(TARGET_GLIBC_MINOR, 16, -1)]
            + ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"])


def target_tags() -> set[Tag]:
    """The wheel tags the GPU machine's CPython 3.12 on x86-64 Linux accepts."""
    version = tuple(int(p) for p in TARGET_PYTHON.split(".")[:2])
    platforms = target_platforms()
    return set(cpython_tags(version, [f"cp{version[0]}{version[1]}"], platforms)) | set(
        compatible_tags(version, f"cp{version[0]}{version[1]}", platforms))


def target_marker_env() -> dict[str, str]:
    env = default_environment()
    env.update(python_version=".".join(TARGET_PYTHON.split(".")[:2]), python_full_version=TARGET_PYTHON,
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
    return env


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical
    version: str
    tags: frozenset[Tag]
    requires_python: str
    requires: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> Wheel:
        name, version, _, tags = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as zf:
            meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(meta_name).decode())
        return cls(path, canonicalize_name(name), str(version), frozenset(tags),
                   meta.get("Requires-Python", ""), tuple(meta.get_all("Requires-Dist") or ()))


def wheels_in(dest: Path) -> list[Wheel]:
    return [Wheel.read(p) for p in sorted(dest.glob("*.whl"))]


def tree_bytes() -> int | None:
    """Bytes of what travels besides carried folders: tracked + untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((REPO / f).stat().st_size for f in out.decode().split("\0") if f and (REPO / f).is_file())


def verify(dest: Path, pins: dict[str, str] | None = None) -> list[str]:
    """Problems with the folder for the GPU machine (empty list: ready to carry)."""
    pins = pinned_versions() if pins is None else pins
    if not dest.is_dir():
        return [f"{dest} does not exist: run `python benchmarks/gpu_wheels.py prepare`"]
    problems: list[str] = []
    wheels = wheels_in(dest)
    by_name: dict[str, list[Wheel]] = {}
    for w in wheels:
        by_name.setdefault(w.name, []).append(w)
    accepted, env = target_tags(), target_marker_env()
    for name in CARRIED:
        want = pins.get(canonicalize_name(name))
        have = by_name.get(canonicalize_name(name), [])
        if not have:
            problems.append(f"no wheel of {name} (pinned {want}) in {dest}")
        elif want and all(Version(w.version) != Version(want) for w in have):
            problems.append(f"{name}: pyproject.toml pins {want}, {dest} holds "
                            f"{', '.join(w.version for w in have)}")
    for name, have in by_name.items():
        if len(have) > 1:  # pip --find-links would pick one silently; keep exactly one
            problems.append(f"{name}: several wheels ({', '.join(w.path.name for w in have)}); keep one")
    for w in wheels:
        if not (w.tags & accepted):
            problems.append(f"{w.path.name}: no tag CPython {TARGET_PYTHON} on x86-64 Linux accepts")
        if w.requires_python:
            from packaging.specifiers import SpecifierSet

            if TARGET_PYTHON not in SpecifierSet(w.requires_python):
                problems.append(f"{w.path.name}: Requires-Python {w.requires_python} excludes {TARGET_PYTHON}")
        for line in w.requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue  # an extra, or another platform's
            dep = canonicalize_name(req.name)
            if dep in by_name:
                continue
            if dep not in IMAGE_HAS:
                problems.append(f"{w.path.name} requires {line!r}: neither in {dest} nor known in the GPU image")
            elif IMAGE_HAS[dep] and not req.specifier.contains(IMAGE_HAS[dep], prereleases=True):
                problems.append(f"{w.path.name} requires {line!r}; the GPU image has {dep} {IMAGE_HAS[dep]}")
    return problems


def size_report(dest: Path) -> tuple[str, bool]:
    wheel_bytes = sum(p.stat().st_size for p in dest.glob("*.whl"))
    tree = tree_bytes()
    total = wheel_bytes + (tree or 0)
    text = (f"wheels {wheel_bytes / 2**20:.1f} MiB + working tree "
            f"{'?' if tree is None else f'{tree / 2**20:.1f}'} MiB = {total / 2**20:.1f} MiB "
            f"of the {CARRY_BUDGET_BYTES / 2**20:.0f} MiB a call may carry")
    return text, total <= CARRY_BUDGET_BYTES


def pip_download(name: str, version: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", TARGET_PYTHON.rsplit(".", 1)[0],
           "--implementation", "cp", "--abi", "cp" + "".join(TARGET_PYTHON.split(".")[:2]),
           *[arg for p in target_platforms() for arg in ("--platform", p)],
           "--dest", str(dest), f"{name}=={version}"]
    subprocess.run(cmd, check=True)


def prepare(dest: Path) -> int:
    pins = pinned_versions()
    dest.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        version = pins[canonicalize_name(name)]
        have = [w for w in wheels_in(dest) if w.name == canonicalize_name(name)]
        if any(Version(w.version) == Version(version) for w in have):
            print(f"{name} {version}: already in {dest}")
        else:
            for w in have:  # another version: pip would see two
                print(f"removing {w.path.name} (pyproject.toml pins {version})")
                w.path.unlink()
            pip_download(name, version, dest)
    return report(dest)


def report(dest: Path) -> int:
    for w in wheels_in(dest):
        print(f"  {w.path.name}  {w.path.stat().st_size / 2**20:.1f} MiB  Requires-Python {w.requires_python or '-'}"
              f"  requires: {', '.join(r for r in w.requires if 'extra ==' not in r) or '-'}")
    problems = verify(dest)
    text, fits = size_report(dest)
    print(text)
    if not fits:
        problems.append("over the carry budget: " + text)
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    if not problems:
        print(f"{dest}: ready for Python {TARGET_PYTHON} on x86-64 Linux")
    return 1 if problems else 0


def install(dest: Path, target: Path, for_target_python: bool) -> int:
    """Offline `pip install --target` of the carried wheels; checks the versions that landed."""
    pins = pinned_versions()
    specs = [f"{n}=={pins[canonicalize_name(n)]}" for n in CARRIED]
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--no-index",
           "--find-links", str(dest), "--no-deps", "--no-compile", "--quiet", "--target", str(target)]
    if for_target_python:
        cmd += ["--only-binary=:all:", "--python-version", TARGET_PYTHON.rsplit(".", 1)[0],
                "--implementation", "cp", "--abi", "cp" + "".join(TARGET_PYTHON.split(".")[:2]),
                *[arg for p in target_platforms() for arg in ("--platform", p)]]
    proc = subprocess.run(cmd + specs)
    if proc.returncode != 0:
        print(f"gpu_wheels: pip install from {dest} failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    stems = [p.name.removesuffix(".dist-info").rsplit("-", 1) for p in target.glob("*.dist-info")]
    installed = {canonicalize_name(name): version for name, version in stems}
    wrong = [f"{s} (found {installed.get(canonicalize_name(s.split('==')[0]), 'nothing')})"
             for s in specs if installed.get(canonicalize_name(s.split("==")[0])) != s.split("==")[1]]
    if wrong:
        print(f"gpu_wheels: {target} lacks {', '.join(wrong)}", file=sys.stderr)
        return 1
    print(f"installed into {target}: {', '.join(specs)}"
          + (f" (wheels for CPython {TARGET_PYTHON}, not this interpreter)" if for_target_python else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["prepare", "verify", "install"])
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="the wheel folder (default .gpu-wheels/)")
    p.add_argument("--target", type=Path, help="install: the folder to install into (then on PYTHONPATH)")
    p.add_argument("--for-target-python", action="store_true",
                   help=f"install: select wheels for CPython {TARGET_PYTHON} on x86-64 Linux, not this interpreter")
    args = p.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.dest)
    if args.command == "verify":
        return report(args.dest)
    if args.target is None:
        p.error("install needs --target")
    return install(args.dest, args.target, args.for_target_python)


if __name__ == "__main__":
    sys.exit(main())
