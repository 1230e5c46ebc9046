"""What real Slurm clusters need of the rendered job scripts, without a cluster: the interpreter
found on the compute node, srun's own --cpus-per-task, host-list expansion, the --mpi fallback,
and TensorRT-LLM's launcher for sampling and judging (tests/slurm/ runs the scripts for real)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_selfreward.config import ConfigError, load_config
from megatron_selfreward.hostlist import HostlistError, expand_nodelist, parse_hostlist
from megatron_selfreward.pipeline.schedule import find_stage, plan
from megatron_selfreward.pipeline.slurm import (
    PYTHON_LAUNCHER_TEXT,
    choose_mpi,
    parse_mpi_list,
    render_script,
    submit_run,
)
from megatron_selfreward.errors import StageError
from tests.conftest import REPO

TINY = REPO / "tests" / "slurm" / "tiny_slurm.yaml"
SRUN_MPI_LIST_22_05 = """MPI plugin types are...
\tpmix
\tnone
\tcray_shasta
\tpmi2
specific pmix plugin versions available: pmix_v4
"""


def _cfg(*overrides: str, run_dir: str = "/scratch/runs/r"):
    return load_config(TINY, [f"pipeline.run_dir={run_dir}", *overrides])


def _srun_line(script: str) -> list[str]:
    return shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))


def _script(cfg, stage: str = "sample_responses", role: str = "array", **kwargs) -> str:
    return render_script(cfg, find_stage(plan(cfg), stage, 1), role, REPO, **kwargs)


# -- the interpreter --------------------------------------------------------------------------


def test_an_empty_python_setting_runs_the_launcher_not_the_submitting_interpreter():
    cmd = _srun_line(_script(_cfg()))
    python = cmd[cmd.index("-m") - 1]
    assert python == "/scratch/runs/r/slurm/python.sh" and python != sys.executable
    explicit = _srun_line(_script(_cfg("executor.slurm.python=/opt/py/bin/python3")))
    assert explicit[explicit.index("-m") - 1] == "/opt/py/bin/python3"


def _fake_bin(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _launch(tmp_path: Path, path_dirs: list[Path], *args: str) -> subprocess.CompletedProcess:
    launcher = tmp_path / "python.sh"
    launcher.write_text(PYTHON_LAUNCHER_TEXT)
    launcher.chmod(0o755)
    env = {"PATH": os.pathsep.join(map(str, path_dirs)), "HOME": str(tmp_path)}
    return subprocess.run([str(launcher), *args], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_the_launcher_takes_the_first_python_on_the_node_path_that_imports_the_package(tmp_path):
    system = tmp_path / "system"  # a python3 without the package: skipped
    _fake_bin(system, "python3", 'case "$*" in *"import megatron_selfreward"*) exit 1;; esac; echo wrong')
    venv = tmp_path / "venv"  # `python` (no python3) of an environment that has it
    _fake_bin(venv, "python", f'exec {shlex.quote(sys.executable)} "$@"')
    proc = _launch(tmp_path, [system, venv, Path("/usr/bin"), Path("/bin")], "-c",
                   "import megatron_selfreward, sys; print('ran', megatron_selfreward.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ran megatron_selfreward"
    assert f"{venv / 'python'}" in proc.stderr  # the job log names the interpreter


def test_the_launcher_fails_clearly_when_no_python_has_the_package(tmp_path):
    system = tmp_path / "system"
    _fake_bin(system, "python3", "exit 1")
    proc = _launch(tmp_path, [system, Path("/usr/bin"), Path("/bin")], "-m", "megatron_selfreward.cli")
    assert proc.returncode == 127
    assert "can import megatron_selfreward" in proc.stderr and "executor.slurm.python" in proc.stderr
    assert str(system) in proc.stderr  # the PATH it searched


# -- srun's CPUs ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, role", [("sample_responses", "array"), ("sample_responses", "gather"),
                                         ("train_dpo", "stage"), ("build_pairs", "stage")])
def test_srun_is_given_the_cpus_per_task_itself(stage, role):
    # Slurm 22.05 - 23.02.4: srun no longer reads SLURM_CPUS_PER_TASK from the batch step.
    cmd = _srun_line(_script(_cfg("executor.slurm.cpus_per_task=6"), stage, role))
    assert "--cpus-per-task=6" in cmd[:cmd.index("-m")]


# -- host lists -------------------------------------------------------------------------------

# `scontrol show hostnames` of Slurm 22.05.8, measured.
HOSTLISTS = {
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "rack[1-2]-node[01-02],login": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02", "login"],
    "gpu[01-03,07],login1": ["gpu01", "gpu02", "gpu03", "gpu07", "login1"],
    "a[9-11],b1": ["a9", "a10", "a11", "b1"],
    "n[08-11]": ["n08", "n09", "n10", "n11"],
    "n[1-010]": ["n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10"],
    "n[001-3]": ["n001", "n002", "n003"],
    "c[1-2]-[3-4]": ["c1-3", "c1-4", "c2-3", "c2-4"],
    "a[1-2][3-4]": ["a13", "a14", "a23", "a24"],
    "rack1-n[008-010]": ["rack1-n008", "rack1-n009", "rack1-n010"],
    "10.0.0.[1-2]": ["10.0.0.1", "10.0.0.2"],
    "x1,x2,x[3-4]": ["x1", "x2", "x3", "x4"],
    "n1,,n2": ["n1", "n2"],
    "n[7]": ["n7"],
    "node1": ["node1"],
}


@pytest.mark.parametrize("nodelist", sorted(HOSTLISTS))
def test_hostlist_expands_like_scontrol(nodelist):
    assert parse_hostlist(nodelist) == HOSTLISTS[nodelist]
    assert expand_nodelist(nodelist) == HOSTLISTS[nodelist]


@pytest.mark.parametrize("bad", ["n[2-1]", "n[]", "n[a-b]", "n[1-2", "n1-2]", "n[[1]]"])
def test_malformed_hostlists_are_errors_naming_the_list(bad):
    with pytest.raises(HostlistError, match=r"host list"):
        parse_hostlist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no Slurm client here")
def test_hostlist_agrees_with_this_machines_scontrol(tmp_path, monkeypatch):
    conf = tmp_path / "slurm.conf"  # scontrol reads a configuration even to expand a list
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=d Nodes=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    lists = sorted(HOSTLISTS)
    proc = subprocess.run(["scontrol", "show", "hostnames", ",".join(n for n in lists if ",," not in n)],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split() == [h for n in lists if ",," not in n for h in HOSTLISTS[n]]


# -- --mpi ------------------------------------------------------------------------------------


def test_srun_mpi_list_is_parsed_in_both_output_formats():
    assert parse_mpi_list(SRUN_MPI_LIST_22_05) == ["pmix", "none", "cray_shasta", "pmi2", "pmix_v4"]
    assert parse_mpi_list("srun: MPI types are...\nsrun: none\nsrun: pmi2\n") == ["none", "pmi2"]


def test_missing_pmix_falls_back_to_pmi2_then_none_and_says_so_in_the_job_log():
    assert choose_mpi("pmix", ["pmix", "pmi2", "none"]) == ("pmix", "")
    assert choose_mpi("pmix", None) == ("pmix", "")  # not checked: as configured
    assert choose_mpi("none", ["none"]) == ("none", "")
    assert choose_mpi("pmix", ["none", "pmi2"])[0] == "pmi2"
    assert choose_mpi("pmix", ["none"])[0] == "none"
    script = _script(_cfg(), mpi_plugins=["none", "pmi2"])
    assert "--mpi=pmi2" in _srun_line(script)
    note = next(line for line in script.splitlines() if line.startswith("echo "))
    assert "executor.slurm.mpi=pmix" in note and "--mpi=pmi2" in note and note.endswith(">&2")
    assert script.index(note) < script.index("srun ")
    script = _script(_cfg(), mpi_plugins=["none"])
    assert not any(arg.startswith("--mpi") for arg in _srun_line(script))
    assert "echo " not in _script(_cfg(), mpi_plugins=parse_mpi_list(SRUN_MPI_LIST_22_05))


def test_submit_checks_srun_mpi_list_and_writes_the_launcher(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_bin(bin_dir, "srun", 'case "$*" in --mpi=list) printf "MPI plugin types are...\\n\\tnone\\n\\tpmi2\\n";; '
                               '*) exit 1;; esac')
    _fake_bin(bin_dir, "sbatch", f'n=$(cat {tmp_path}/n 2>/dev/null || echo 100); echo $((n+1)) > {tmp_path}/n; '
                                 'echo $((n+1))')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = _cfg(run_dir=str(tmp_path / "run"))
    said: list[str] = []
    jobs = submit_run(cfg, log=said.append, workdir=REPO)
    assert any("--mpi=pmi2" in line for line in said)
    scripts = {Path(j.script).name: Path(j.script).read_text() for j in jobs}
    assert "--mpi=pmi2" in _srun_line(scripts["sample_responses-i1-array.sbatch"])
    launcher = tmp_path / "run" / "slurm" / "python.sh"
    assert launcher.read_text() == PYTHON_LAUNCHER_TEXT and os.access(launcher, os.X_OK)


# -- TensorRT-LLM -----------------------------------------------------------------------------


def _trtllm(*overrides: str):
    return _cfg("generation.engine=trtllm", "generation.tensor_parallel_size=2", "executor.slurm.gpus_per_node=4",
                "executor.slurm.ntasks_per_node=4", "parallel.tensor_model_parallel_size=2", *overrides)


def _sbatch_options(script: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].partition("=")[::2] for line in script.splitlines()
                if line.startswith("#SBATCH --"))


@pytest.mark.parametrize("stage", ["sample_responses", "judge_responses"])
def test_trtllm_array_tasks_start_under_trtllm_llmapi_launch_with_pmix(stage):
    script = _script(_trtllm("executor.slurm.mpi=none"), stage, mpi_plugins=["pmix", "none"])
    line = next(line for line in script.splitlines() if line.startswith("srun "))
    cmd = shlex.split(line)
    launch = cmd.index("trtllm-llmapi-launch")
    assert "--mpi=pmix" in cmd[:launch] and "--cpus-per-task=1" in cmd[:launch]
    # rank 0 runs the stage with SLURM_* removed: the array task is passed on explicitly
    assert cmd[launch + 1] == "env"
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        assert f'{name}="${name}"' in line
    assert cmd[cmd.index("-m") + 1:cmd.index("-m") + 4] == ["megatron_selfreward.cli", "stage", stage]
    assert cmd[-1] == "--array"
    # one replica a task: one srun task per GPU of its LLM (TP 2), not the training layout (4 a node)
    opts = _sbatch_options(script)
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"]) == ("1", "2", "2")
    # gathering and the other stages are launched as before
    for other in (_script(_trtllm(), stage, "gather"), _script(_trtllm(), "train_dpo", "stage")):
        assert "trtllm-llmapi-launch" not in other
    assert _sbatch_options(_script(_trtllm(), "train_dpo", "stage"))["ntasks-per-node"] == "4"
    assert "trtllm-llmapi-launch" not in _script(_cfg(), stage)


def test_a_trtllm_replica_wider_than_a_node_spans_nodes_evenly():
    opts = _sbatch_options(_script(_trtllm("generation.tensor_parallel_size=8", "model.num_attention_heads=8",
                                           "model.num_query_groups=8", "model.ffn_hidden_size=256")))
    assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"]) == ("2", "4", "4")


def test_trtllm_array_tasks_need_pmix_and_leave_array_nodes_alone():
    with pytest.raises(ConfigError, match=r"executor\.slurm\.array_nodes"):
        _script(_trtllm("executor.slurm.array_nodes=2"))
    with pytest.raises(StageError, match="pmix"):
        _script(_trtllm(), mpi_plugins=["pmi2", "none"])
