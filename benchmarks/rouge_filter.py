"""Self-Instruct's ROUGE-L filter at paper scale: 50,000 candidates against a growing pool.

The candidates (tests/instruction_corpus.py: templates x topics x constraints, 5 to ~40 words,
30% paraphrases of an earlier instruction) are screened in order by `Pool.screen` against the
seed pool (3,200 instructions, the paper's IFT seed size) plus every candidate kept before them,
once per thread count. For comparison, the previous filter (pure-Python LCS against every pool
member, one candidate at a time) is timed on a small sample, its decisions checked against the
fast one's, and its time for the full run estimated from its per-pair cost.

    python benchmarks/rouge_filter.py [--candidates 50000] [--seed-pool 3200] [--threads 1,2]

Writes benchmarks/results/rouge_filter.json and .md (date, command, CPU, load average).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections import Counter
from pathlib import Path

from recording import versions, write_results  # benchmarks/recording.py (beside this script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_selfreward.precision import read_cpu_info  # noqa: E402
from megatron_selfreward.stages.prompts import Pool  # noqa: E402
from megatron_selfreward.stages.rouge import filter_threads, rouge_l_f, rouge_tokens  # noqa: E402
from tests.instruction_corpus import synthetic_instructions  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BUDGET_S = 600.0


def fast_run(seed: list[str], candidates: list[str], threshold: float, threads: int) -> dict:
    start = time.perf_counter()
    pool = Pool(seed, threshold)
    pool.index.workers = threads
    built = time.perf_counter()
    reasons = pool.screen(candidates)
    done = time.perf_counter()
    counts = Counter(r or "accepted" for r in reasons)
    return {"threads": threads, "candidates": len(candidates), "seed_pool": len(seed),
            "pool_at_end": len(seed) + counts["accepted"], "accepted": counts["accepted"],
            "rejected": {k: v for k, v in sorted(counts.items()) if k != "accepted"},
            "build_s": round(built - start, 3), "screen_s": round(done - built, 3),
            "seconds": round(done - start, 3), "candidates_per_s": round(len(candidates) / (done - start), 1),
            "pairs_scored": pool.index.pairs_scored,
            "ns_per_pair": round((done - built) / max(1, pool.index.pairs_scored) * 1e9, 2),
            "reasons": reasons}


def old_run(seed: list[str], candidates: list[str], threshold: float) -> dict:
    """The previous filter: `any(rouge_l_f(candidate, member) > threshold)` over the pool."""
    exact = {" ".join(t.split()).casefold() for t in seed}
    pool = [rouge_tokens(t) for t in seed]
    reasons, pairs = [], 0
    start = time.perf_counter()
    for text in candidates:
        key = " ".join(text.split()).casefold()
        if key in exact:
            reasons.append("duplicate")
            continue
        tokens = rouge_tokens(text)
        reason = None
        for member in pool:
            pairs += 1
            if rouge_l_f(tokens, member) > threshold:
                reason = "rouge_l_similar"
                break
        if reason is None:
            exact.add(key)
            pool.append(tokens)
        reasons.append(reason)
    seconds = time.perf_counter() - start
    return {"candidates": len(candidates), "seed_pool": len(seed), "pool_at_end": len(pool),
            "accepted": reasons.count(None), "seconds": round(seconds, 3), "pairs": pairs,
            "ms_per_candidate": round(seconds / len(candidates) * 1e3, 2),
            "us_per_pair": round(seconds / pairs * 1e6, 3), "reasons": reasons}


def pairs_for(seed_size: int, reasons: list) -> tuple[int, int]:
    """Pairs the previous filter scores for these decisions: at least (every kept candidate meets
    the whole pool) and at most (every candidate does; it stops at a rejected one's first hit)."""
    pool, kept_pairs, all_pairs = seed_size, 0, 0
    for reason in reasons:
        if reason != "duplicate":
            all_pairs += pool
            kept_pairs += pool if reason is None else 0
        pool += reason is None
    return kept_pairs, all_pairs


def _versions() -> dict[str, str]:
    return versions("rapidfuzz", "numpy", "rouge-score")


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Self-Instruct ROUGE-L filter at paper scale",
        "",
        f"- date: {result['date']}",
        f"- machine: {m['cpu']}, {m['cpus']} CPUs usable; 1-minute load average before/after each run "
        f"in the table (the machine is shared: {m['cpus']} = all cores busy)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- command: `{result['command']}`",
        f"- workload: {result['workload']}",
        "",
        "| filter | threads | candidates | seed pool | pool at end | accepted | seconds | candidates/s | pairs scored | ns a pair | load 1-min before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(f"| rapidfuzz (Pool.screen) | {run['threads']} | {run['candidates']:,} | {run['seed_pool']:,} "
                     f"| {run['pool_at_end']:,} | {run['accepted']:,} | {run['seconds']} | {run['candidates_per_s']:,} "
                     f"| {run['pairs_scored']:,} | {run['ns_per_pair']} | {run['load_before']} / {run['load_after']} |")
    old = result["old"]
    lines.append(f"| previous (pure-Python LCS) | 1 | {old['candidates']:,} | {old['seed_pool']:,} | {old['pool_at_end']:,} "
                 f"| {old['accepted']:,} | {old['seconds']} | {round(old['candidates'] / old['seconds'], 1)} "
                 f"| {old['pairs']:,} | {round(old['us_per_pair'] * 1e3)} | {old['load_before']} / {old['load_after']} |")
    best = min(result["runs"], key=lambda r: r["seconds"])
    lines += [
        "",
        f"Rejected in the full run: {best['rejected']} ({result['rejected_share']:.1%} of the candidates); "
        f"budget {BUDGET_S:.0f} s: {'within' if best['seconds'] <= BUDGET_S else 'OVER'}.",
        "",
        f"The previous filter took {old['ms_per_candidate']} ms a candidate on its sample "
        f"({old['us_per_pair']} us a pair, {old['pairs']:,} pairs) and made the same decisions as the fast one "
        f"on it: {old['same_decisions']}. For the full run's decisions it would score between "
        f"{result['old_full_run_pairs'][0]:,} and {result['old_full_run_pairs'][1]:,} pairs (a kept candidate "
        "meets every member; a rejected one stops at its first hit): "
        f"{result['old_full_run_hours'][0]} to {result['old_full_run_hours'][1]} hours on one core at that rate.",
        "",
        f"Worst case, every candidate kept (pool {result['runs'][0]['seed_pool'] + result['runs'][0]['candidates']:,} "
        f"at the end): about {result['all_kept_estimate_s']} s with {best['threads']} threads (estimated: the full run's "
        "share of pairs left by the length windows, at its time a pair).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=50_000)
    parser.add_argument("--seed-pool", type=int, default=3_200)
    parser.add_argument("--near-duplicate-share", type=float, default=0.3)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--threads", default=f"1,{filter_threads()}", help="comma-separated thread counts")
    parser.add_argument("--old-candidates", type=int, default=300)
    parser.add_argument("--old-pool", type=int, default=1_000)
    parser.add_argument("--name", default="rouge_filter")
    args = parser.parse_args()

    texts = synthetic_instructions(args.seed_pool + args.candidates, seed=0,
                                   near_duplicate_share=args.near_duplicate_share)
    seed, candidates = texts[:args.seed_pool], texts[args.seed_pool:]
    runs = []
    for threads in sorted({int(t) for t in args.threads.split(",")}):
        before = os.getloadavg()[0]
        run = fast_run(seed, candidates, args.threshold, threads)
        run["load_before"], run["load_after"] = round(before, 2), round(os.getloadavg()[0], 2)
        runs.append(run)
        print(f"threads {threads}: {run['seconds']} s, {run['candidates_per_s']} candidates/s, "
              f"accepted {run['accepted']}, pool at end {run['pool_at_end']}", flush=True)
    assert all(r["reasons"] == runs[0]["reasons"] for r in runs), "thread counts disagree"

    old_seed, old_candidates = seed[:args.old_pool], candidates[:args.old_candidates]
    before = os.getloadavg()[0]
    old = old_run(old_seed, old_candidates, args.threshold)
    old["load_before"], old["load_after"] = round(before, 2), round(os.getloadavg()[0], 2)
    old["same_decisions"] = old.pop("reasons") == Pool(old_seed, args.threshold).screen(old_candidates)
    low_pairs, high_pairs = pairs_for(len(seed), runs[0]["reasons"])

    reasons = runs[0]["reasons"]
    for run in runs:
        del run["reasons"]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpu": read_cpu_info().model, "cpus": filter_threads(), "cores": os.cpu_count()},
        "versions": _versions(),
        "workload": (f"{args.candidates:,} synthetic instructions (tests/instruction_corpus.py, seed 0, "
                     f"{args.near_duplicate_share:.0%} paraphrases of an earlier one) screened in order against "
                     f"{args.seed_pool:,} seed instructions plus every candidate kept before them; "
                     f"ROUGE-L F > {args.threshold} rejects"),
        "runs": runs,
        "rejected_share": round(1 - reasons.count(None) / len(reasons), 4),
        "old": old,
        "old_full_run_pairs": [low_pairs, high_pairs],
        "old_full_run_hours": [round(n * old["us_per_pair"] / 1e6 / 3600, 1) for n in (low_pairs, high_pairs)],
        "budget_s": BUDGET_S,
    }
    # If every candidate were kept (the pool grows to seed + all): same share of pairs left by
    # the length windows, same time a pair as the fastest run.
    best = min(runs, key=lambda r: r["seconds"])
    all_kept = sum(range(len(seed), len(seed) + len(candidates)))
    result["all_kept_estimate_s"] = round(all_kept * best["pairs_scored"] / high_pairs * best["ns_per_pair"] / 1e9, 1)
    print(write_results(args.name, result, _markdown, RESULTS))


if __name__ == "__main__":
    main()
