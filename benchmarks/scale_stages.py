"""Stage files at paper scale: time and peak memory of the steps from judge outputs to pairs.

Paper scale (paper-spec section 4): tens of thousands of prompts x 4 responses x 3 judge samples,
about 200k responses and 600k judge samples per iteration. For each size, counted in judge samples
(responses = samples / 3, prompts = responses / 4), this writes synthetic records of realistic
sizes (prompts ~200 chars, responses ~1.5k chars, judge outputs ~500 chars ending in a
"Score: x" line, ~6% of them unparsable) with the project's record classes and writers, in
shards exactly as `run_sharded` lays them out. Then it runs each step in a fresh Python process
and reads its wall time and peak RSS (ru_maxrss; the RSS after imports is recorded beside it):

  gather_responses   the responses' shards joined into responses.jsonl (run_sharded, gather only)
  gather_judgements  the same for judgements.jsonl
  parse_scores       every judge output of judgements.jsonl parsed again (parse_score) and the
                     Judgement records written anew, streamed
  build_pairs        run_build_pairs: prompts + responses + judgements -> pairs.jsonl + manifest
  judge_health       iteration_judge_health, as the evaluate stage and the report call it
  pairs_and_health   both in one process: the goal is <= 2 min and <= 1 GB at 600k samples
  rm_metrics         reward_model_metrics over EFT-eval-like ranked items (2-5 responses, mean
                     ~2.85; mean-of-3 scores, ~2% failed), one item per 2.85 judged responses

Writes benchmarks/results/<name>.{json,md} with date, command, CPU model, cores, versions and the
1-minute load average before and after every step (the machine may be shared).

    python benchmarks/scale_stages.py [--sizes 10000 100000 600000] [--work /tmp/scale_stages]
    # the same steps on other code, e.g. an earlier commit exported with `git archive`:
    git archive COMMIT megatron_selfreward kernels | tar -x -C /tmp/old_tree
    python benchmarks/scale_stages.py --code /tmp/old_tree --label "COMMIT" --name scale_stages_before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recording import versions, write_results  # benchmarks/recording.py (beside this script)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STEPS = ("gather_responses", "gather_judgements", "parse_scores", "build_pairs", "judge_health",
         "pairs_and_health", "rm_metrics")
RESPONSES_PER_PROMPT, SAMPLES_PER_RESPONSE = 4, 3
SHARD_SIZE = 64  # pipeline.shard_size's default
GOAL_SAMPLES, GOAL_WALL_S, GOAL_RSS_MB = 600_000, 120.0, 1024.0
WORDS = ("the of and to in is that it for as with was on be by this are or from at an which have "
         "not but can more one all their will would there what about when if so out up into than "
         "response answer question model helpful accurate detail explain example because however "
         "consider result specific relevant clear concise user request information provide step "
         "first second finally important note également naïve").split()


# --------------------------------------------------------------------------- synthetic data


class _Texts:
    """Texts of about a given length from a pool of random sentences (fast, and varied enough
    that JSON parsing sees realistic strings: words, punctuation, newlines, a few non-ASCII)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pool = [self._sentence() for _ in range(4000)]

    def _sentence(self) -> str:
        words = self.rng.choices(WORDS, k=self.rng.randint(6, 18))
        end = self.rng.choice([". ", ". ", ". ", "? ", ".\n", ":\n- "])
        return " ".join(words).capitalize() + end

    def text(self, chars: int) -> str:
        out, n = [], 0
        while n < chars:
            part = self.pool[self.rng.randrange(len(self.pool))]
            out.append(part)
            n += len(part)
        return "".join(out)[:chars].rstrip()


def _judge_output(texts: _Texts) -> str:
    rng = texts.rng
    verdict = texts.text(rng.randint(380, 520))
    roll = rng.random()
    if roll < 0.03:  # no score at all (cut at max_new_tokens)
        return verdict
    if roll < 0.05:  # a score on another scale
        return f"{verdict}\nScore: {rng.randint(6, 10)}"
    if roll < 0.06:
        return f"{verdict}\nScore: {rng.randint(6, 10)}/10"
    score = rng.choices([0, 1, 2, 3, 4, 5], weights=[2, 5, 10, 23, 40, 20])[0]
    return f"{verdict}\nScore: {score}"


def _sizes(samples: int) -> dict[str, int]:
    prompts = samples // (SAMPLES_PER_RESPONSE * RESPONSES_PER_PROMPT)
    responses = prompts * RESPONSES_PER_PROMPT
    return {"judge_samples": responses * SAMPLES_PER_RESPONSE, "responses": responses, "prompts": prompts}


def _generate(run_dir: Path, samples: int) -> dict:
    """iter1/{prompts,responses,judgements} shards as the stages leave them before gathering."""
    from megatron_selfreward.io import write_jsonl
    from megatron_selfreward.judging.parse import judgement_from_outputs
    from megatron_selfreward.records import Judgement, Prompt, Response
    from megatron_selfreward.stages.shards import Workers, run_sharded

    n = _sizes(samples)
    it = run_dir / "iter1"
    it.mkdir(parents=True, exist_ok=True)
    texts = _Texts(seed=samples)
    write_jsonl(it / "prompts.jsonl", (Prompt(f"p{i:06d}", texts.text(texts.rng.randint(150, 250)), "generated")
                                       for i in range(n["prompts"])))
    shards_only = Workers(gathers=False, name="benchmark")

    def responses(shard: range) -> list[Response]:
        return [Response(f"p{i:06d}", f"p{i:06d}-r{r}", texts.text(texts.rng.randint(1000, 2000)),
                         texts.rng.randint(200, 450), "stop")
                for i in shard for r in range(RESPONSES_PER_PROMPT)]

    def judgements(shard: range) -> list[Judgement]:
        out = []
        for k in shard:
            pid = f"p{k // RESPONSES_PER_PROMPT:06d}"
            outputs = [_judge_output(texts) for _ in range(SAMPLES_PER_RESPONSE)]
            out.append(judgement_from_outputs(pid, f"{pid}-r{k % RESPONSES_PER_PROMPT}", outputs))
        return out

    run_sharded(range(n["prompts"]), SHARD_SIZE, it / "responses.jsonl", {"benchmark": samples},
                responses, Response, workers=shards_only)
    run_sharded(range(n["responses"]), SHARD_SIZE, it / "judgements.jsonl",
                {"benchmark": samples}, judgements, Judgement, workers=shards_only)
    return n


def _ranked_items(count: int, seed: int):
    """EFT-eval-like (model scores, human ranks): 2-5 responses (mean ~2.85), scores means of 3
    samples from 0..5 loosely following the human order, ~2% failed."""
    rng = random.Random(seed)
    for _ in range(count):
        k = rng.choices([2, 3, 4, 5], weights=[45, 32, 15, 8])[0]
        ranks = list(range(k))
        rng.shuffle(ranks)
        scores = []
        for r in ranks:
            ok = [min(5, max(0, round(4.2 - 0.6 * r + rng.gauss(0, 1.2)))) for _ in range(3)
                  if rng.random() > 0.02]
            scores.append(sum(ok) / len(ok) if ok else None)
        yield scores, ranks


# ------------------------------------------------------------------------- one measurement


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _step(name: str, run_dir: Path, samples: int) -> dict:
    """Run one step here; returns what it did. The caller measures a fresh process per step."""
    from megatron_selfreward.records import Judgement, Response
    from megatron_selfreward.stages.evaluate import iteration_judge_health
    from megatron_selfreward.stages.respond import run_build_pairs
    from megatron_selfreward.stages.shards import GATHER_ONLY, run_sharded

    n, it = _sizes(samples), run_dir / "iter1"

    def no_compute(shard):
        raise RuntimeError("every shard should be on disk")

    def pairs() -> dict:
        for stale in (it / "pairs.jsonl", it / "pairs.manifest.json"):
            stale.unlink(missing_ok=True)
        run_build_pairs(it / "prompts.jsonl", it / "responses.jsonl", it / "judgements.jsonl", it / "pairs.jsonl",
                        {"benchmark": "scale_stages"})
        return json.loads((it / "pairs.manifest.json").read_text())["counts"]

    def health() -> dict:
        h = iteration_judge_health(run_dir, 1)
        return {k: h[k] for k in ("num_judgements", "num_samples", "sample_failure_rate", "num_prompts",
                                  "prompts_paired", "prompts_tied", "pairs_written")}

    baseline = _rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    if name == "gather_responses":
        records, _ = run_sharded(range(n["prompts"]), SHARD_SIZE, it / "responses.jsonl", {"benchmark": samples},
                                 no_compute, Response, workers=GATHER_ONLY)
        did = {"records": len(records)}
    elif name == "gather_judgements":
        records, _ = run_sharded(range(n["responses"]), SHARD_SIZE, it / "judgements.jsonl",
                                 {"benchmark": samples}, no_compute, Judgement, workers=GATHER_ONLY)
        did = {"records": len(records)}
    elif name == "parse_scores":
        from megatron_selfreward.io import iter_records, write_jsonl
        from megatron_selfreward.judging.parse import judgement_from_outputs

        rescored = (judgement_from_outputs(j.prompt_id, j.response_id, j.raw_outputs)
                    for j in iter_records(it / "judgements.jsonl", Judgement))
        did = {"records": write_jsonl(run_dir / "rescored.jsonl", rescored)}
        (run_dir / "rescored.jsonl").unlink()
    elif name == "build_pairs":
        did = pairs()
    elif name == "judge_health":
        did = health()
    elif name == "pairs_and_health":
        did = {**pairs(), **health()}
    elif name == "rm_metrics":
        from megatron_selfreward.judging.metrics import reward_model_metrics

        items = round(n["responses"] / 2.85)
        m = reward_model_metrics(_ranked_items(items, seed=samples))
        did = {"instructions": m["num_instructions"], "pairwise_accuracy": m["pairwise_accuracy"],
               "spearman_mean": m["spearman_mean"], "kendall_tau_b_mean": m["kendall_tau_b_mean"]}
    else:
        raise SystemExit(f"unknown step {name!r}; one of {', '.join(STEPS)}")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak, 1),
            "rss_after_imports_mb": round(baseline, 1), "did": did}


def _in_fresh_process(args: list[str], code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, cwd="/",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    return versions("scipy", "numpy", "psutil")


def _dir_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def to_markdown(r: dict) -> str:
    v = r["versions"]
    lines = [f"# Stage files at paper scale ({r['date']})", "", f"`{r['command']}`", "",
             f"CPU: **{r['cpu']}**, {r['cores']} cores; Python {v['python']}, scipy {v['scipy']}, numpy "
             f"{v['numpy']}; code measured: {r['code']}. Load average (1 min) before the first step "
             f"{r['load_1min_first']}, after the last {r['load_1min_last']}; each row gives the 1-min "
             "load when its step started (the machine is shared; 2 = both cores busy).", "",
             "Sizes in judge samples (responses = samples / 3, prompts = responses / 4); every step in a "
             "fresh process; CPU s is the step's user + system time (what the step costs when the "
             "machine is shared); peak RSS is the process's ru_maxrss, imports included (RSS after "
             "imports beside it).", "",
             "| judge samples | responses | prompts | step | wall s | CPU s | peak RSS MB | RSS after imports MB "
             "| load 1 min |", "|---|---|---|---|---|---|---|---|---|"]
    for size in r["sizes"]:
        n = size["counts"]
        for step, m in size["steps"].items():
            lines.append(f"| {n['judge_samples']:,} | {n['responses']:,} | {n['prompts']:,} | {step} | "
                         f"{m['wall_s']} | {m['cpu_s']} | {m['peak_rss_mb']} | {m['rss_after_imports_mb']} | "
                         f"{m['load_1min']} |")
    lines += ["", "Files per size (MB): " + "; ".join(
        f"{s['counts']['judge_samples']:,} samples: responses {s['files_mb']['responses']}, judgements "
        f"{s['files_mb']['judgements']}, pairs {s['files_mb']['pairs']}" for s in r["sizes"]), ""]
    goal = r.get("goal")
    if goal:
        lines += [f"Goal at {GOAL_SAMPLES:,} judge samples, pairs + judge health in one process: "
                  f"{goal['wall_s']} s wall, {goal['cpu_s']} s CPU (<= {GOAL_WALL_S:.0f} s) and "
                  f"{goal['peak_rss_mb']} MB (<= {GOAL_RSS_MB:.0f} MB): "
                  f"**{'met' if goal['met'] else 'NOT met'}**.", ""]
    return "\n".join(lines)


def measure(sizes: list[int], work: Path, code: Path, label: str, steps: list[str], command: str) -> dict:
    result = {"date": time.strftime("%Y-%m-%d"), "command": command, "cpu": _cpu_model(),
              "cores": os.cpu_count(), "versions": _versions(), "code": f"{label} ({code})",
              "load_1min_first": round(os.getloadavg()[0], 2), "sizes": []}
    for samples in sizes:
        run_dir = work / f"samples_{samples}"
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        # Written with this checkout's code, the same files for every code measured.
        counts = _in_fresh_process(["--generate", str(samples), "--dir", str(run_dir)], REPO)
        print(f"{samples:,} judge samples: data written in {time.perf_counter() - started:.0f} s", flush=True)
        row: dict = {"counts": counts, "steps": {}}
        for step in steps:
            load = round(os.getloadavg()[0], 2)
            m = _in_fresh_process(["--step", step, "--samples", str(samples), "--dir", str(run_dir)], code)
            m["load_1min"] = load
            row["steps"][step] = m
            print(f"  {step:18s} {m['wall_s']:8.2f} s  CPU {m['cpu_s']:8.2f} s  "
                  f"peak RSS {m['peak_rss_mb']:8.1f} MB  (after imports {m['rss_after_imports_mb']} MB, "
                  f"load {load})  {m['did']}", flush=True)
        it = run_dir / "iter1"
        row["files_mb"] = {name: round((it / f"{name}.jsonl").stat().st_size / 2**20, 1)
                           if (it / f"{name}.jsonl").is_file() else None
                           for name in ("responses", "judgements", "pairs")}
        row["files_mb"]["shards"] = round(sum(_dir_mb(d) for d in it.glob("*.shards")), 1)
        result["sizes"].append(row)
        shutil.rmtree(run_dir, ignore_errors=True)
        if samples == GOAL_SAMPLES and "pairs_and_health" in row["steps"]:
            m = row["steps"]["pairs_and_health"]
            result["goal"] = {"wall_s": m["wall_s"], "cpu_s": m["cpu_s"], "peak_rss_mb": m["peak_rss_mb"],
                              "met": m["wall_s"] <= GOAL_WALL_S and m["peak_rss_mb"] <= GOAL_RSS_MB}
    result["load_1min_last"] = round(os.getloadavg()[0], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 600_000],
                        help="judge samples per size")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--work", default="/tmp/scale_stages", help="scratch directory (removed per size)")
    parser.add_argument("--code", default=str(REPO), help="the tree whose megatron_selfreward is measured")
    parser.add_argument("--label", default="this checkout", help="what --code is, for the results (e.g. a commit)")
    parser.add_argument("--name", default="scale_stages", help="result file stem under benchmarks/results/")
    # internal: one step (or the data) in this process
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate is not None:
        print(json.dumps(_generate(Path(args.dir), args.generate)))
        return
    if args.step is not None:
        print(json.dumps(_step(args.step, Path(args.dir), args.samples)))
        return
    command = "python benchmarks/scale_stages.py " + " ".join(sys.argv[1:])
    result = measure(args.sizes, Path(args.work), Path(args.code).resolve(), args.label, args.steps,
                     command.strip())
    print(write_results(args.name, result, to_markdown, RESULTS))


if __name__ == "__main__":
    main()
