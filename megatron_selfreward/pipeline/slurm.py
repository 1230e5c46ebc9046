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

What real clusters need of the launch lines:
- the interpreter is found on the compute node (after the setup lines, inside the container),
  not taken from the submitting host: `<run_dir>/slurm/python.sh` picks python3 or python from
  the node's PATH that imports megatron_selfreward, or says why none does;
- srun gets `--cpus-per-task` itself: Slurm 22.05 to 23.02.4 do not pass sbatch's on to srun;
- `--mpi` is checked against `srun --mpi=list` at submission; a missing plugin falls back to
  pmi2 (or none), said at submission and in each job's log;
- with `generation.engine: trtllm` a sampling or judging array task is one replica, one srun
  task per GPU of its LLM (generation.tensor_parallel_size), started by TensorRT-LLM's own
  launcher (`srun --mpi=pmix ... trtllm-llmapi-launch python ...`): rank 0 runs the stage, the
  other ranks serve its engine's MPI workers, which the LLM API cannot spawn under srun.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from megatron_selfreward.config import Config, ConfigError, generation_tp, save_resolved, tasks_per_node
from megatron_selfreward.errors import StageError
from megatron_selfreward.io import atomic_write_json, atomic_write_text
from megatron_selfreward.pipeline.local import stage_done
from megatron_selfreward.pipeline.registry import SHARDED_STAGES, STAGE_KINDS
from megatron_selfreward.pipeline.schedule import StageSpec, plan

Log = Callable[[str], None]
PYTHON_LAUNCHER = "python.sh"  # in <run_dir>/slurm/, used when executor.slurm.python is empty
# The array-task variables trtllm-llmapi-launch removes (with every SLURM_*) from the stage's
# environment on rank 0; the job script passes them on explicitly.
ARRAY_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")

# A POSIX shell script: it runs before any Python, on the compute node.
PYTHON_LAUNCHER_TEXT = """\
#!/bin/sh
# The interpreter of this run's stage jobs (executor.slurm.python is empty): the first of
# python3, python on the PATH where the job runs (after its setup lines, inside its container)
# that can import megatron_selfreward. Rendered by `selfreward slurm submit`.
for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import megatron_selfreward' >/dev/null 2>&1; then
        if [ "${SLURM_PROCID:-0}" = 0 ]; then
            echo "selfreward: $(hostname): $(command -v "$py")" >&2
        fi
        exec "$py" "$@"
    fi
done
echo "selfreward: on $(hostname) neither python3 nor python on PATH can import megatron_selfreward" \\
     "(PATH=$PATH). Install it into the cluster's Python, add executor.slurm.setup lines that" \\
     "make it available (module load ..., source .../bin/activate), or set executor.slurm.python." >&2
exit 127
"""


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


def _trtllm_launch(cfg: Config, spec: StageSpec, role: str) -> bool:
    """Sampling/judging array tasks with TensorRT-LLM start under trtllm-llmapi-launch."""
    return role == "array" and spec.name in SHARDED_STAGES and cfg.generation.engine == "trtllm"


def job_shape(cfg: Config, spec: StageSpec, role: str) -> dict[str, int]:
    """nodes, tasks per node and GPUs per node of a stage's job."""
    sl = cfg.executor.slurm
    if _trtllm_launch(cfg, spec, role):
        return _trtllm_replica_shape(cfg)
    if role == "array":
        return {"nodes": sl.array_nodes, "ntasks_per_node": tasks_per_node(sl), "gpus_per_node": sl.gpus_per_node}
    if spec.distributed:
        return {"nodes": sl.nodes, "ntasks_per_node": tasks_per_node(sl), "gpus_per_node": sl.gpus_per_node}
    # A model in one process (registry `uses_gpus`: generation, evaluation, conversion) gets the
    # node's GPUs in one task (a TensorRT-LLM engine spreads over them itself).
    gpus = sl.gpus_per_node if STAGE_KINDS[spec.name].uses_gpus else 0
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


def parse_mpi_list(text: str) -> list[str]:
    """Plugin names in the output of `srun --mpi=list` (22.05: a header, one tab-indented name a
    line, then "specific pmix plugin versions available: pmix_v4"; older: "srun: name" lines)."""
    names: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"^srun:\s*", "", line).strip()
        versions = re.search(r"versions available:\s*(.*)", line)
        if versions:
            names += [v.strip() for v in versions.group(1).split(",") if v.strip()]
        elif re.fullmatch(r"[A-Za-z0-9_]+", line):
            names.append(line)
    return names


def available_mpi_plugins() -> list[str] | None:
    """What `srun --mpi=list` offers here; None when it cannot be asked (no srun, an error)."""
    if shutil.which("srun") is None:
        return None
    try:
        proc = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, env=_clean_env(),
                              timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return None
    names = parse_mpi_list(proc.stdout + "\n" + proc.stderr)
    return names if proc.returncode == 0 and names else None


def choose_mpi(requested: str, available: Sequence[str] | None) -> tuple[str, str]:
    """(the srun --mpi value, why it is not `requested` or ""). `available` None: not checked."""
    if not requested or requested == "none":
        return "none", ""
    if available is None or requested in available:
        return requested, ""
    fallback = "pmi2" if "pmi2" in available else "none"
    return fallback, (f"executor.slurm.mpi={requested} is not available here (srun --mpi=list: "
                      f"{', '.join(available) or 'nothing'}); using --mpi={fallback}")


def _trtllm_replica_shape(cfg: Config) -> dict[str, int]:
    """An array task of TensorRT-LLM generation: one replica, whose LLM's MPI world is the
    task's srun tasks, one per GPU: generation.tensor_parallel_size of them, on as few nodes
    as gpus_per_node allows."""
    sl, tp = cfg.executor.slurm, generation_tp(cfg)
    if sl.array_nodes != 1:
        raise ConfigError("config key 'executor.slurm.array_nodes': with generation.engine=trtllm an array "
                          f"task is one replica of generation.tensor_parallel_size={tp} GPUs, its nodes follow "
                          "from executor.slurm.gpus_per_node; leave array_nodes at 1 (more replicas: "
                          "executor.slurm.array_tasks)")
    if not sl.gpus_per_node:
        return {"nodes": 1, "ntasks_per_node": tp, "gpus_per_node": 0}
    nodes = -(-tp // sl.gpus_per_node)
    if tp % nodes:
        raise ConfigError(f"config key 'generation.tensor_parallel_size': a TensorRT-LLM replica of {tp} GPUs "
                          f"does not split evenly over {nodes} nodes of executor.slurm.gpus_per_node="
                          f"{sl.gpus_per_node}")
    return {"nodes": nodes, "ntasks_per_node": tp // nodes, "gpus_per_node": tp // nodes}


def python_command(cfg: Config) -> str:
    """The interpreter in the job scripts: executor.slurm.python, else the run's launcher."""
    return cfg.executor.slurm.python or str(slurm_dir(cfg) / PYTHON_LAUNCHER)


def render_script(cfg: Config, spec: StageSpec, role: str = "stage", workdir: Path | None = None,
                  mpi_plugins: Sequence[str] | None = None) -> str:
    """The sbatch script of one stage job (role: stage, array or gather). `mpi_plugins`: what
    `srun --mpi=list` offers (None: the configured plugin, unchecked)."""
    sl = cfg.executor.slurm
    run_dir = _run_dir(cfg)
    workdir = (workdir or Path.cwd()).resolve()
    command = [python_command(cfg), "-m", "megatron_selfreward.cli", "stage", spec.name, "--iteration",
               str(spec.iteration), "--config", str(run_dir / "config.yaml")]
    if role == "array":
        command.append("--array")
    elif role == "gather":
        command.append("--gather-only")
    trtllm = _trtllm_launch(cfg, spec, role)
    mpi, note = choose_mpi("pmix" if trtllm else sl.mpi, mpi_plugins)
    if trtllm:
        if mpi != "pmix":
            raise StageError(f"{spec.label}: generation.engine=trtllm starts its engine's MPI workers with "
                             f"`srun --mpi=pmix ... trtllm-llmapi-launch`, but this Slurm has no pmix plugin "
                             f"(srun --mpi=list: {', '.join(mpi_plugins or []) or 'nothing'})")
    srun = ["srun", "--kill-on-bad-exit=1"]
    if mpi != "none":
        srun.append(f"--mpi={mpi}")
    srun.append(f"--cpus-per-task={sl.cpus_per_task}")
    if sl.container_image:
        srun.append(f"--container-image={sl.container_image}")
        if sl.container_mounts:
            srun.append(f"--container-mounts={sl.container_mounts}")
        srun.append(f"--container-workdir={workdir}")
    launch = shlex.join(srun)
    if trtllm:
        # The array variables are expanded here, in the batch shell, and set again for rank 0.
        launch += " trtllm-llmapi-launch env " + " ".join(f'{name}="${name}"' for name in ARRAY_VARS)
    lines = ["#!/bin/bash", *_sbatch_lines(cfg, spec, role, run_dir / "slurm" / "logs"),
             f"# {spec.label} [{role}] of {run_dir}: rendered by `selfreward slurm submit`; the",
             "# stage itself decides everything (skips if done, resumes from finished shards).",
             "set -euo pipefail"]
    if note:
        lines.append(f"echo {shlex.quote('selfreward: ' + note)} >&2")
    lines += [*sl.setup, f"cd {shlex.quote(str(workdir))}", f"{launch} {shlex.join(command)}", ""]
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
    write_python_launcher(cfg)
    mpi_plugins = available_mpi_plugins()
    _, note = choose_mpi(cfg.executor.slurm.mpi, mpi_plugins)
    if note:
        log(f"  {note}")
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
            atomic_write_text(script, render_script(cfg, spec, role, workdir, mpi_plugins))
            job_id = _sbatch(script, after)
            jobs.append(Job(spec.name, spec.iteration, job_id, str(script), role))
            log(f"  {spec.label} [{role}]: job {job_id}" + (f" after {','.join(after)}" if after else ""))
            after = [job_id]  # the gather job waits for the whole array
        for out in spec.outputs.values():
            producer[out.resolve()] = jobs[-1].job_id
    _record(cfg, jobs)
    return jobs


def write_python_launcher(cfg: Config) -> None:
    """`<run_dir>/slurm/python.sh`, which the job scripts start when executor.slurm.python is empty."""
    path = slurm_dir(cfg) / PYTHON_LAUNCHER
    atomic_write_text(path, PYTHON_LAUNCHER_TEXT)
    path.chmod(0o755)


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
