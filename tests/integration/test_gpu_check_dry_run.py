"""benchmarks/gpu_check.sh --cpu-dry-run: the GPU machine's whole flow on this CPU with the tiny model.

The wheel folder is a stand-in with megatron-core's name, version, tags and requirements: the
dry run checks it and installs it offline as pip would pick it for the GPU machine's Python
3.12, then runs every part in its own process (this environment's megatron-core) and writes the
JSON and markdown. The numbers are asserted to be complete and consistent, not fast.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO
from tests.standin_wheel import make_wheel

PARTS = {"sft", "dpo", "generate", "logprobs"}


def _pinned(name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith(name + "=="))


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])


@pytest.mark.slow
def test_cpu_dry_run_writes_every_part(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    make_wheel(wheels, "megatron-core", _pinned("megatron-core"),
               "cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64",
               requires=("torch>=2.6.0", "numpy", "packaging>=24.2"))
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--wheels", str(wheels),
                           "--out-dir", str(out), "--repeats", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "(wheels for CPython 3.12.3, not this interpreter)" in proc.stdout
    assert "CPU dry run" in proc.stdout  # the import check ran

    result = json.loads((out / "gpu_cpu.json").read_text())
    assert result["errors"] == {}
    assert set(result["results"]) == PARTS and set(result["timings_s"]) == PARTS
    assert result["date"] and result["hardware"]["torch"] and result["settings"]["device"] == "cpu"

    sft = result["results"]["sft"]
    _positive(sft, "tokens", "tokens_per_s", "step_time_s_mean", "flops_per_token", "peak_flop_s", "mfu")
    assert sft["steps_measured"] == 3 and sft["mfu"] < 1
    assert sft["mfu"] == pytest.approx(sft["tokens_per_s"] * sft["flops_per_token"] / sft["peak_flop_s"])

    dpo = result["results"]["dpo"]
    _positive(dpo, "tokens", "tokens_per_s", "step_time_s_mean", "reference_time_s", "flops_per_token",
              "policy_flops", "reference_flops", "mfu", "mfu_policy_steps", "mfu_reference_forward")
    assert dpo["steps_measured"] == 2 and dpo["reference_pairs"] == 12 and dpo["pairs_truncated"] == 0
    assert dpo["policy_flops"] == pytest.approx(dpo["tokens"] * dpo["flops_per_token"])
    assert dpo["reference_flops"] == pytest.approx(dpo["policy_flops"] / 3)
    seconds = dpo["steps_measured"] * (dpo["step_time_s_mean"] + dpo["reference_time_s_per_step"])
    assert dpo["mfu"] == pytest.approx((dpo["policy_flops"] + dpo["reference_flops"]) / seconds / dpo["peak_flop_s"])
    # One rate over the summed work and time lies between the two rates it combines.
    low, high = sorted([dpo["mfu_policy_steps"], dpo["mfu_reference_forward"]])
    assert low * (1 - 1e-9) <= dpo["mfu"] <= high * (1 + 1e-9)

    gen = result["results"]["generate"]
    assert [g["batch"] for g in gen] == [1, 4]
    for g in gen:
        assert g["decode_tokens"] == g["batch"] * 16
        _positive(g, "prefill_tokens_per_s", "decode_tokens_per_s", "decode_bound_tokens_per_s", "bandwidth_fraction")
    assert result["settings"]["bandwidth_tb_s"] == 4.8

    impls = {r["impl"] for r in result["results"]["logprobs"]}
    assert {"reference (fp32 [T, V] logits)", "torch chunked"} <= impls
    for r in result["results"]["logprobs"]:
        _positive(r, "fwd_bwd_ms")
        assert r["max_abs_diff_vs_reference"] < 1e-4

    table = (out / "gpu_cpu.md").read_text()
    assert result["date"] in table and "## DPO step" in table and "failed" not in table
