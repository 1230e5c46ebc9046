"""One judge stage of the default preset on an idle machine and on a busy one.

A shared machine (a login node, a CPU partition, a container with a CPU quota) keeps other
processes running. This times `selfreward stage judge_responses --iteration 1` of the embedded
default (SmolLM2-135M on CPU) idle, then with one busy process per usable core competing
(`while True: pass`), and reports the slowdown. A fair share of the cores would explain about
(busy + ours) / ours; much more than that means our threads fight each other (OpenMP teams
sized to all cores and spinning, see megatron_selfreward/threads.py). Target: slowdown <= 3x.

Variants of the busy run, each a fresh judge stage on the same responses:
- `auto`: what `selfreward` does (threads from the affinity mask / cgroup quota, passive waits);
- `active`: the same thread count with OpenMP spinning (`OMP_WAIT_POLICY=ACTIVE`), the
  behaviour without the passive wait policy;
- `1 thread`: `executor.cpu_threads=1`.

The run directory is prepared once (seed, M0, EFT, SFT, prompts, responses of iteration 1),
with fewer prompts and SFT steps than the preset so that preparing takes minutes; the judge
stage itself is the preset's (its verdict length, batch size and forced scores).

    python benchmarks/busy_machine.py [--prompts 12] [--work /tmp/busy_machine] [--variants auto,active,1]

Writes benchmarks/results/busy_machine.{json,md} (date, CPU model, load before each run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recording import write_results  # benchmarks/recording.py (beside this script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
PRESET = "smollm2_135m_cpu"
STAGE, ITERATION = "judge_responses", 1
TARGET_SLOWDOWN = 3.0


def _selfreward(overrides: list[str], *args: str, env: dict | None = None) -> float:
    """Run `selfreward ARGS --config PRESET OVERRIDES` (the installed entry point); seconds."""
    cmd = [sys.executable, "-m", "megatron_selfreward.cli", *args, "--config", PRESET, *overrides]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _plan(overrides: list[str]):
    from megatron_selfreward.config import load_config
    from megatron_selfreward.pipeline.schedule import plan

    cfg = load_config(REPO / "configs" / f"{PRESET}.yaml", overrides)
    return cfg, plan(cfg)


def prepare(overrides: list[str]) -> None:
    """Every stage the judge stage of iteration 1 needs, in plan order (evaluation skipped)."""
    _, stages = _plan(overrides)
    for spec in stages:
        if spec.name == STAGE and spec.iteration == ITERATION:
            return
        if spec.name.startswith("evaluate") or spec.name == "report":
            continue
        print(f"  preparing {spec.label}", flush=True)
        _selfreward(overrides, "stage", spec.name, "--iteration", str(spec.iteration))


def _clear_judge_stage(overrides: list[str]) -> None:
    from megatron_selfreward.pipeline.schedule import find_stage
    from megatron_selfreward.stages.manifest import manifest_path
    from megatron_selfreward.stages.shards import clear_shards

    _, stages = _plan(overrides)
    spec = find_stage(stages, STAGE, ITERATION)
    for path in [spec.output, *spec.outputs.values()]:
        path.unlink(missing_ok=True)
    manifest_path(spec.output).unlink(missing_ok=True)
    clear_shards(spec.output)


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _usable() -> int:
    from megatron_selfreward.threads import usable_cpus

    return usable_cpus().cpus


def time_judge(overrides: list[str], busy: int, variant: str) -> dict:
    _clear_judge_stage(overrides)
    env = dict(os.environ)
    extra = list(overrides)
    if variant == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    elif variant == "1":
        extra.append("executor.cpu_threads=1")
    load = os.getloadavg()[0]
    competitors = _busy(busy)
    try:
        seconds = _selfreward(extra, "stage", STAGE, "--iteration", str(ITERATION), env=env)
    finally:
        for proc in competitors:
            proc.kill()
            proc.wait()
    return {"variant": variant, "busy_processes": busy, "wall_time_s": round(seconds, 2),
            "load_1min_before": round(load, 2)}


def _markdown(result: dict) -> str:
    idle = result["idle_s"]
    lines = [
        "# One judge stage, idle and with busy competitors",
        "",
        f"Date: {result['date']}. CPU: {result['cpu']} ({result['usable_cpus']} usable). "
        f"Command: `{result['command']}`.",
        f"Judge stage of `{PRESET}` iteration 1 with {result['prompts']} prompts "
        f"(x4 responses x3 judge samples). Target: slowdown <= {TARGET_SLOWDOWN:g}x.",
        "",
        "| run | busy processes | wall time (s) | slowdown vs idle | load (1 min) before |",
        "|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        slowdown = row["wall_time_s"] / idle if idle else float("nan")
        lines.append(f"| {row['variant']} | {row['busy_processes']} | {row['wall_time_s']:.1f} | "
                     f"{slowdown:.2f}x | {row['load_1min_before']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--work", type=Path, default=Path("/tmp/busy_machine"))
    parser.add_argument("--variants", default="auto,active,1")
    parser.add_argument("--keep", action="store_true", help="reuse a prepared --work directory")
    parser.add_argument("--name", default="busy_machine", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    from megatron_selfreward.precision import read_cpu_info

    overrides = [f"pipeline.run_dir={args.work}", f"generation.prompts.num_prompts={args.prompts}",
                 "sft.max_steps=1"]
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"preparing {args.work} (seed, M0, EFT, SFT, prompts, responses)", flush=True)
    prepare(overrides)
    busy = _usable()
    runs = [time_judge(overrides, 0, "auto")]
    print(f"  idle: {runs[0]['wall_time_s']} s", flush=True)
    for variant in args.variants.split(","):
        runs.append(time_judge(overrides, busy, variant))
        print(f"  {busy} busy, {variant}: {runs[-1]['wall_time_s']} s", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "cpu": read_cpu_info().model, "usable_cpus": busy, "prompts": args.prompts,
              "idle_s": runs[0]["wall_time_s"], "runs": runs,
              "target_slowdown": TARGET_SLOWDOWN}
    result["slowdown_auto"] = round(runs[1]["wall_time_s"] / runs[0]["wall_time_s"], 2) if len(runs) > 1 else None
    print(write_results(args.name, result, _markdown, RESULTS))


if __name__ == "__main__":
    main()
