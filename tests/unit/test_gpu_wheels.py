"""benchmarks/gpu_wheels.py: what it accepts for the GPU machine, and the offline install, on stand-in wheels."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO
from tests.standin_wheel import make_wheel

_spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "benchmarks" / "gpu_wheels.py")
wheels = importlib.util.module_from_spec(_spec)
sys.modules["gpu_wheels"] = wheels  # dataclasses look their module up
_spec.loader.exec_module(wheels)

PINS = {"megatron-core": "0.16.1"}
DEPS = ("torch>=2.6.0", "numpy", "packaging>=24.2", 'einops~=0.8; extra == "dev"')


def test_pinned_version_is_read_from_pyproject():
    assert wheels.pinned_versions()["megatron-core"] == "0.16.1"


def test_the_real_wheel_shape_is_accepted(tmp_path):
    # Tags and requirements as megatron-core 0.16.1's cp312 wheel on PyPI declares them.
    make_wheel(tmp_path, "megatron-core", "0.16.1", "cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64",
               requires=DEPS)
    assert wheels.verify(tmp_path, PINS) == []


@pytest.mark.parametrize("tag, requires_python, requires, problem", [
    ("cp311-cp311-manylinux_2_28_x86_64", ">=3.10", DEPS, "no tag CPython 3.12.3"),
    ("cp312-cp312-macosx_11_0_arm64", ">=3.10", DEPS, "no tag CPython 3.12.3"),
    ("cp312-cp312-manylinux_2_40_x86_64", ">=3.10", DEPS, "no tag CPython 3.12.3"),  # newer glibc than the image's
    ("py3-none-any", ">=3.13", DEPS, "Requires-Python >=3.13 excludes 3.12.3"),
    ("py3-none-any", ">=3.10", ("torch>=2.12",), "the GPU image has torch 2.11.0"),
    ("py3-none-any", ">=3.10", ("flask-restful",), "neither in"),
])
def test_what_would_fail_there_is_named(tmp_path, tag, requires_python, requires, problem):
    make_wheel(tmp_path, "megatron-core", "0.16.1", tag, requires_python=requires_python, requires=requires)
    problems = wheels.verify(tmp_path, PINS)
    assert len(problems) == 1 and problem in problems[0], problems


def test_missing_wrong_version_and_duplicate_wheels_are_named(tmp_path):
    assert "does not exist" in wheels.verify(tmp_path / "nope", PINS)[0]
    tmp_path.mkdir(exist_ok=True)
    assert "no wheel of megatron-core" in wheels.verify(tmp_path, PINS)[0]
    make_wheel(tmp_path, "megatron-core", "0.17.0")
    assert "pins 0.16.1" in wheels.verify(tmp_path, PINS)[0]
    make_wheel(tmp_path, "megatron-core", "0.16.1")
    assert any("several wheels" in p for p in wheels.verify(tmp_path, PINS))


def test_install_for_the_target_python_offline(tmp_path, capsys):
    folder = tmp_path / "wheels"
    make_wheel(folder, "megatron-core", wheels.pinned_versions()["megatron-core"], requires=DEPS)
    target = tmp_path / "site"
    assert wheels.install(folder, target, for_target_python=True) == 0
    assert (target / "megatron_core_standin" / "__init__.py").is_file()
    assert "installed into" in capsys.readouterr().out


def test_install_refuses_a_wheel_for_another_interpreter(tmp_path):
    folder = tmp_path / "wheels"
    make_wheel(folder, "megatron-core", wheels.pinned_versions()["megatron-core"], "cp39-cp39-win_amd64")
    assert wheels.install(folder, tmp_path / "site", for_target_python=True) != 0


@pytest.mark.skipif(not wheels.DEFAULT_DEST.is_dir(), reason="no .gpu-wheels/ (python benchmarks/gpu_wheels.py prepare)")
def test_the_prepared_folder_is_ready():
    assert wheels.verify(wheels.DEFAULT_DEST) == []
    assert wheels.size_report(wheels.DEFAULT_DEST)[1]
