"""The newest supported megatron-core runs our checkpoint code: HF -> Megatron -> HF bit for bit,
converted and re-saved checkpoints that give transformers' logits, and checkpoints converted
under 0.16.1 (what CPU installs get) that it reads.

pip resolves megatron-core 0.16.1 on Python 3.11 (0.17+ declare Requires-Python >= 3.12), while
GPU clusters run what their NGC container ships, up to the end of `compat.SUPPORTED`. This test
installs MEGATRON_CORE_LATEST into its own venv under .cache/ (git-ignored, built once; needs
PyPI, and fails without it), which sees the Python environment running the tests behind its own
site-packages (torch, triton, transformers, this package), and runs tests/mcore_latest_worker.py
with that venv's Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_selfreward.convert.hf_checkpoint import HFWeights  # noqa: E402
from megatron_selfreward.convert.hf_megatron import convert_hf_to_megatron  # noqa: E402
from megatron_selfreward.megatron.compat import is_supported  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.unit.test_convert_llama import SEQ, TINY, hf_logits, make_hf_dir  # noqa: E402

MEGATRON_CORE_LATEST = "0.19.2"
VENV = REPO / ".cache" / f"mcore-{MEGATRON_CORE_LATEST}"
STAMP = VENV / "ready.json"


def _parent_site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _build_venv(expected: dict) -> None:
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True)
    python = VENV / "bin" / "python"
    # --no-deps: its dependencies (torch, numpy, packaging, psutil, tqdm) come from the parent
    # environment; --ignore-requires-python: 0.17+ declare Python >= 3.12 but run on 3.11.
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
         "--ignore-requires-python", f"megatron-core=={MEGATRON_CORE_LATEST}"],
        capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        shutil.rmtree(VENV, ignore_errors=True)
        pytest.fail(f"pip could not install megatron-core=={MEGATRON_CORE_LATEST} into {VENV}; this "
                    f"test needs PyPI (CI has it):\n{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}")
    site = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True)
    # After the venv's own site-packages (megatron-core latest), the parent environment's: a
    # plain `--system-site-packages` venv made from a venv sees the base interpreter's instead.
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in expected["parent_site"])
    (Path(site.strip()) / "parent_environment.pth").write_text(lines)
    STAMP.write_text(json.dumps(expected))


@pytest.fixture(scope="module")
def latest_python() -> Path:
    """The venv's Python, (re)built when missing or made for another parent environment."""
    if importlib.util.find_spec("triton") is None:
        pytest.fail("megatron-core 0.19 imports triton: install the test extra (pip install -e '.[test]')")
    expected = {"megatron_core": MEGATRON_CORE_LATEST, "parent_site": _parent_site_dirs()}
    if not (STAMP.is_file() and json.loads(STAMP.read_text()) == expected):
        _build_venv(expected)
    return VENV / "bin" / "python"


def read_tensors(hf: Path) -> dict[str, torch.Tensor]:
    weights = HFWeights(hf)
    return {name: weights.get(name) for name in weights.specs}


def test_the_pinned_latest_release_is_in_the_supported_range():
    assert is_supported(MEGATRON_CORE_LATEST)


@pytest.mark.slow
@pytest.mark.usefixtures("process_world")  # the converter's world
def test_conversion_and_checkpoints_under_the_latest_megatron_core(latest_python, tmp_path):
    from safetensors.torch import save_file

    root, out = tmp_path / "in", tmp_path / "out"
    hf = make_hf_dir(root / "hf", tied=False, seed=7)
    tokens = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(9))
    save_file({"tokens": tokens, "logits": hf_logits(hf, tokens).contiguous()}, root / "reference.safetensors")
    convert_hf_to_megatron(hf, root / "megatron_0161")  # this process: megatron-core 0.16.1
    out.mkdir()
    cmd = [str(latest_python), "tests/mcore_latest_worker.py", "--root", str(root), "--out", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    result = json.loads((out / "result.json").read_text())
    # One file per tensor: our streaming strategy wrote it, not megatron's (one file per rank).
    assert len(list((out / "megatron").glob("*.distcp"))) > 2
    # 0.19's package_info appends the short hash of the git repository around the installed
    # files (here: this one) to __version__; the gate reads the distribution's metadata.
    assert result["megatron_core"].split("+")[0] == MEGATRON_CORE_LATEST == result["gate"]
    assert result["megatron_core_file"].startswith(str(VENV))
    original = read_tensors(hf)
    for back in ("hf_back", "from_0161"):
        returned = read_tensors(out / back)
        assert original.keys() == returned.keys(), back
        assert all(torch.equal(original[k], returned[k]) for k in original), back
    assert all(diff < 1e-4 for diff in result["max_abs_diff"].values()), result
