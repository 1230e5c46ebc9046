"""The Slurm executor: the plan's stages as sbatch jobs chained with `--dependency=afterok`.

`submit_run(cfg)` walks the same `plan(cfg)` the local executor runs, skips the leading stages
whose manifests say done, and submits one job per remaining stage, each `afterok` on the jobs
that write its inputs (so evaluating M_t runs beside iteration t's generation).
Sharded generation stages (sample_responses, judge_responses) become a job array whose tasks
split the shards (`selfreward stage NAME --array`) plus a one-task job that gathers them
(`--gather-only`). Training stages get `executor.slurm.nodes` x tasks-per-node processes (one per
GPU) started by srun; Megatron's world is read from SLURM_* in each. Every job carries
`--kill-on-invalid-dep=yes`: when a stage fails, its dependents are cancelled, never left pending.

The sbatch scripts are rendered into `<run_dir>/slurm/` (readable, re-submittable by hand) and run
`selfreward stage ...` on the run's resolved config.yaml: the scripts only launch, every decision
stays in Python. Job ids go to `<run_dir>/slurm/jobs.json`, which `slurm_status` reads back with
`scontrol` (or `sacct` where accounting is set up).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from megatron_selfreward.config import Config, ConfigError, save_resolved, tasks_per_node
from megatron_selfreward.io import atomic_write_json, atomic_write_text
from megatron_selfreward.pipeline.local import stage_done
from megatron_selfreward.pipeline.plan import StageSpec, plan
from megatron_selfreward.pipeline.workers import SHARDED_STAGES
from megatron_selfreward.stages.errors import StageError

Log = Callable[[str], None]
# Stages that run a model in one process (generation, evaluation, conversion): one task with
# the node's GPUs (a TensorRT-LLM engine spreads over them itself).
MODEL_STAGES = frozenset({"import_model", "build_eft", "generate_prompts", "evaluate"})


@dataclass
class Job:
    stage: str
    iteration: int
    job_id: str
    script: str
    role: str = "stage"  # "stage", "array" (shard tasks) or "gather"


def _run_dir(cfg: Config) -> Path:
    return Path(cfg.pipeline.run_dir).resolve()


def slurm_dir(cfg: Config) -> Path:
    return _run_dir(cfg) / "slurm"


def _job_prefix(cfg: Config) -> str:
    """What every job name of this run starts with."""
    return "sr-" + re.sub(r"[^A-Za-z0-9_.-]", "_", _run_dir(cfg).name) + "-"


def _job_name(cfg: Config, spec: StageSpec, role: str) -> str:
    suffix = f"-i{spec.iteration}" if spec.iteration else ""
    return f"{_job_prefix(cfg)}{spec.name}{suffix}" + ("-gather" if role == "gather" else "")


def job_shape(cfg: Config, spec: StageSpec, role: str) -> dict[str, int]:
    """nodes, tasks per node and GPUs per node of a stage's job."""
    sl = cfg.executor.slurm
    if role == "array":
        return {"nodes": sl.array_nodes, "ntasks_per_node": tasks_per_node(sl), "gpus_per_node": sl.gpus_per_node}
    if spec.distributed:
        return {"nodes": sl.nodes, "ntasks_per_node": tasks_per_node(sl), "gpus_per_node": sl.gpus_per_node}
    gpus = sl.gpus_per_node if spec.name in MODEL_STAGES else 0
    return {"nodes": 1, "ntasks_per_node": 1, "gpus_per_node": gpus}


def _sbatch_lines(cfg: Config, spec: StageSpec, role: str, log_dir: Path) -> list[str]:
    sl = cfg.executor.slurm
    shape = job_shape(cfg, spec, role)
    log_name = "%x-%A_%a.out" if role == "array" else "%x-%j.out"
    options = [f"--job-name={_job_name(cfg, spec, role)}", f"--output={log_dir / log_name}",
               f"--nodes={shape['nodes']}", f"--ntasks-per-node={shape['ntasks_per_node']}",
               f"--cpus-per-task={sl.cpus_per_task}", "--kill-on-invalid-dep=yes"]
    if shape["gpus_per_node"]:
        options.append(f"--gpus-per-node={shape['gpus_per_node']}")
    if role == "array":
        options.append(f"--array=0-{sl.array_tasks - 1}")
    for key, value in (("time", sl.time), ("partition", sl.partition), ("account", sl.account),
                       ("qos", sl.qos), ("mem", sl.mem)):
        if value:
            options.append(f"--{key}={value}")
    options += sl.extra_sbatch
    return [f"#SBATCH {option}" for option in options]


def render_script(cfg: Config, spec: StageSpec, role: str = "stage", workdir: Path | None = None) -> str:
    """The sbatch script of one stage job (role: stage, array or gather)."""
    sl = cfg.executor.slurm
    run_dir = _run_dir(cfg)
    workdir = (workdir or Path.cwd()).resolve()
    command = [sl.python or sys.executable, "-m", "megatron_selfreward.cli", "stage", spec.name, "--iteration",
               str(spec.iteration), "--config", str(run_dir / "config.yaml")]
    if role == "array":
        command.append("--array")
    elif role == "gather":
        command.append("--gather-only")
    srun = ["srun", "--kill-on-bad-exit=1"]
    if sl.mpi and sl.mpi != "none":
        srun.append(f"--mpi={sl.mpi}")
    if sl.container_image:
        srun.append(f"--container-image={sl.container_image}")
        if sl.container_mounts:
            srun.append(f"--container-mounts={sl.container_mounts}")
        srun.append(f"--container-workdir={workdir}")
    lines = ["#!/bin/bash", *_sbatch_lines(cfg, spec, role, run_dir / "slurm" / "logs"),
             f"# {spec.label} [{role}] of {run_dir}: rendered by `selfreward slurm submit`; the",
             "# stage itself decides everything (skips if done, resumes from finished shards).",
             "set -euo pipefail", *sl.setup, f"cd {shlex.quote(str(workdir))}",
             shlex.join(srun + command), ""]
    return "\n".join(lines)


def _clean_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """sbatch from inside a job (slurm/iteration.sh) must not pass that job's SLURM_* on."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def _sbatch(script: Path, after: Sequence[str]) -> str:
    if shutil.which("sbatch") is None:
        raise StageError("sbatch is not on PATH: run `selfreward slurm submit` on a Slurm login node "
                         "(or use `selfreward run` for this machine)")
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd.append("--dependency=afterok:" + ":".join(after))
    cmd.append(str(script))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), check=False)
    if proc.returncode != 0:
        raise StageError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def stages_to_submit(cfg: Config, up_to_iteration: int | None = None) -> list[StageSpec]:
    """The plan's stages up to iteration `up_to_iteration` (all when None), in order."""
    chosen = []
    for spec in plan(cfg):
        if spec.name == "evaluate":
            belongs_to = spec.iteration - 1  # evaluate(M_{t+1}) closes iteration t
        else:
            belongs_to = spec.iteration
        if spec.name == "report" or up_to_iteration is None or belongs_to <= up_to_iteration:
            chosen.append(spec)
    return chosen


def active_jobs(cfg: Config) -> list[str]:
    """Pending or running jobs of this run (by job-name prefix), as 'id name state'."""
    if shutil.which("squeue") is None:
        return []
    proc = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                          env=_clean_env(), check=False)
    return [line for line in proc.stdout.splitlines() if len(line.split()) == 3 and
            line.split()[1].startswith(_job_prefix(cfg))]


def submit_run(cfg: Config, up_to_iteration: int | None = None, log: Log = print,
               workdir: Path | None = None, force: bool = False) -> list[Job]:
    """Render and submit every unfinished stage (up to an iteration) as a dependency chain."""
    if cfg.pipeline.iterations and up_to_iteration is not None and up_to_iteration > cfg.pipeline.iterations:
        raise ConfigError(f"--iteration {up_to_iteration}: the config has pipeline.iterations="
                          f"{cfg.pipeline.iterations}")
    busy = active_jobs(cfg)
    if busy and not force:
        raise StageError("jobs of this run are still queued or running:\n  " + "\n  ".join(busy) +
                         "\nwait for them, `scancel` them, or pass --force to submit alongside")
    run_dir = _run_dir(cfg)
    save_resolved(cfg, run_dir)
    scripts = slurm_dir(cfg)
    (scripts / "logs").mkdir(parents=True, exist_ok=True)
    jobs: list[Job] = []
    producer: dict[Path, str] = {}  # output path -> the job that writes it
    for spec in stages_to_submit(cfg, up_to_iteration):
        # Once one stage is submitted, every later one is too: it may consume the new outputs
        # (a job whose stage turns out done when it starts exits at once).
        if not jobs and stage_done(spec):
            log(f"  {spec.label}: done, not submitted")
            continue
        if spec.name == "report":  # summarises everything: after the last job of each branch
            after = sorted(set(producer.values()), key=int)
        else:
            after = sorted({producer[p.resolve()] for p in spec.inputs.values() if p.resolve() in producer},
                           key=int)
        roles = ("array", "gather") if spec.name in SHARDED_STAGES else ("stage",)
        for role in roles:
            stem = f"{spec.name}-i{spec.iteration}" + ("" if role == "stage" else f"-{role}")
            script = scripts / f"{stem}.sbatch"
            atomic_write_text(script, render_script(cfg, spec, role, workdir))
            job_id = _sbatch(script, after)
            jobs.append(Job(spec.name, spec.iteration, job_id, str(script), role))
            log(f"  {spec.label} [{role}]: job {job_id}" + (f" after {','.join(after)}" if after else ""))
            after = [job_id]  # the gather job waits for the whole array
        for out in spec.outputs.values():
            producer[out.resolve()] = jobs[-1].job_id
    _record(cfg, jobs)
    return jobs


def _record(cfg: Config, jobs: Sequence[Job]) -> None:
    path = slurm_dir(cfg) / "jobs.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": [asdict(j) for j in jobs]})
    atomic_write_json(path, history)


# ---------------------------------------------------------------------------------------------
# Status


def job_state(job_id: str, env: Mapping[str, str] | None = None) -> str:
    """PENDING/RUNNING/COMPLETED/FAILED/CANCELLED... from scontrol (recent jobs) or sacct."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          env=_clean_env(env), check=False)
    states = re.findall(r"\bJobState=(\S+)", proc.stdout)
    if states:
        distinct = sorted(set(states))  # an array: one line per task
        return distinct[0] if len(distinct) == 1 else ",".join(distinct)
    if shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                              capture_output=True, text=True, env=_clean_env(env), check=False)
        states = sorted({line.split()[0] for line in proc.stdout.splitlines() if line.strip()})
        if states:
            return ",".join(states)
    return "UNKNOWN"


def slurm_status(cfg: Config) -> list[dict[str, Any]]:
    """One row per stage of the plan: done or not (manifest), and its latest jobs' states."""
    path = slurm_dir(cfg) / "jobs.json"
    latest: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for submission in json.loads(path.read_text()) if path.is_file() else []:
        for job in submission["jobs"]:
            key = (job["stage"], job["iteration"])
            if job["role"] in ("stage", "array"):
                latest[key] = []  # a newer submission of this stage replaces the older
            latest.setdefault(key, []).append(job)
    rows = []
    for spec in plan(cfg):
        jobs = latest.get((spec.name, spec.iteration), [])
        rows.append({"stage": spec.label, "done": stage_done(spec),
                     "jobs": [{"job_id": j["job_id"], "role": j["role"], "state": job_state(j["job_id"])}
                              for j in jobs]})
    return rows


def format_status(rows: Sequence[dict[str, Any]]) -> str:
    width = max(len(r["stage"]) for r in rows) if rows else 10
    lines = [f"{'stage':<{width}}  {'manifest':<9} jobs"]
    for r in rows:
        jobs = ", ".join(f"{j['job_id']} {j['role']} {j['state']}" for j in r["jobs"]) or "-"
        lines.append(f"{r['stage']:<{width}}  {'done' if r['done'] else '-':<9} {jobs}")
    return "\n".join(lines)


def wait_for(job_ids: Sequence[str], timeout_s: float, poll_s: float = 2.0,
             env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Poll until every job has ended (or the timeout); their final states."""
    ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
             "BOOT_FAIL", "DEADLINE"}
    deadline = time.time() + timeout_s
    states: dict[str, str] = {}
    while True:
        states = {job: job_state(job, env) for job in job_ids}
        if all(all(part in ended for part in s.split(",")) for s in states.values()):
            return states
        if time.time() > deadline:
            raise TimeoutError(f"jobs still not finished after {timeout_s:.0f} s: {states}")
        time.sleep(poll_s)
