"""`write_report(cfg, run_dir)`: `report/report.md`, `report/plots/*.png`, `report/throughput.json`.

throughput.json (schema 2): `conventions` (how FLOPs, tokens and the MFU peak are counted),
`peak` (the FLOP/s MFU divides by and its source), `stages` (wall time per manifest),
`generation` (prefill/decode split per generating stage), `training` (tokens/s, FLOPs per
token, MFU per training run), `memory` (the run's peak RSS/CUDA memory, and each stage's when
its manifest records one). The computations live in `perf/accounting.py`.

The report is rebuilt from the run directory's files every time (it is cheap), so it can be
written mid-run and again at the end. Sections with no data say what is missing rather than
disappearing, and a "What is missing" list up front collects every gap.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from megatron_selfreward.config import Config
from megatron_selfreward.io import atomic_write_json, atomic_write_text
from megatron_selfreward.perf.accounting import (
    CAUSAL_HALVED,
    PEAK_CACHE_FILE,
    Peak,
    cached_peak,
    conventions,
    generation_accounting,
    run_memory,
    training_accounting,
)
from megatron_selfreward.report import plots
from megatron_selfreward.report.collect import RunData, collect, generation_throughput, training_throughput
from megatron_selfreward.report.warnings import degenerate_outputs, precision_lines
from megatron_selfreward.stages.manifest import write_manifest

__all__ = ["PAPER_TABLE4", "write_report", "load_run_config"]

# Yuan et al. 2024, Table 4 (Llama 2 70B): reference numbers, not targets for small models.
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "SFT baseline": {"pairwise_accuracy": 0.651, "five_best_frac": 0.396, "exact_match_frac": 0.101,
                     "spearman_mean": 0.253, "kendall_tau_b_mean": 0.233},
    "M1": {"pairwise_accuracy": 0.787, "five_best_frac": 0.415, "exact_match_frac": 0.131,
           "spearman_mean": 0.279, "kendall_tau_b_mean": 0.253},
    "M2": {"pairwise_accuracy": 0.804, "five_best_frac": 0.443, "exact_match_frac": 0.143,
           "spearman_mean": 0.331, "kendall_tau_b_mean": 0.315},
    "M3": {"pairwise_accuracy": 0.817, "five_best_frac": 0.432, "exact_match_frac": 0.143,
           "spearman_mean": 0.349, "kendall_tau_b_mean": 0.324},
}
_PERCENT_METRICS = {"pairwise_accuracy", "five_best_frac", "exact_match_frac"}
NA = "–"


# ---------------------------------------------------------------------------------------------
# Formatting


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _pct(value: Any) -> str:
    return NA if value is None else f"{100 * value:.1f}%"


def _metric(key: str, value: Any) -> str:
    return _pct(value) if key in _PERCENT_METRICS else (NA if value is None else f"{value:.3f}")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return out + [""]


def _image(path: Path | None, alt: str, report_dir: Path) -> list[str]:
    return [f"![{alt}]({path.relative_to(report_dir).as_posix()})", ""] if path else []


def _not_available(why: str) -> list[str]:
    return [f"_Not available: {why}._", ""]


# ---------------------------------------------------------------------------------------------
# Sections

# Parts of a stage with manifests of their own; their time is inside the parent's.
NESTED_STAGE_PREFIXES = ("evaluate_",)


def _elapsed_s(data: RunData) -> float | None:
    """First stage start (finish - wall time) to last finish, idle gaps and resumes included."""
    spans = [(s.started_epoch_s, s.finished_epoch_s) for s in data.stages if s.finished_epoch_s is not None]
    return max(f for _, f in spans) - min(b for b, _ in spans) if spans else None  # type: ignore[type-var]


def _header(data: RunData) -> list[str]:
    cfg = data.cfg
    model = f"{cfg.model.name} ({cfg.model.source}{': ' + cfg.model.path if cfg.model.path else ''})" if cfg else NA
    planned = cfg.pipeline.iterations if cfg else NA
    found = ", ".join(str(it.number) for it in data.iterations) or "none"
    top = [s for s in data.stages if not s.stage.startswith(NESTED_STAGE_PREFIXES)]
    stage_total = sum(s.wall_time_s or 0.0 for s in top)
    elapsed = _elapsed_s(data)
    rows = [("model", model), ("iterations", f"{planned} planned; found {found}"),
            ("models", ", ".join(data.models) or "none"),
            ("wall time", f"{stage_total:,.1f} s in {len(top)} stage(s) with manifests"
                          + (f"; {elapsed:,.0f} s from the first start to the last finish" if elapsed else "")),
            ("precision", "; ".join(precision_lines(data)) or NA),
            ("written", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))]
    return [f"# Self-rewarding run report: {data.run_dir.name}", ""] + _table(["", ""], rows)


def _warnings(found: list[str]) -> list[str]:
    lines = ["## Warnings: degenerate outputs", ""]
    if not found:
        return lines + ["None: every stage's output has the size and quality the checks ask for.", ""]
    return lines + [f"- **{w}**" for w in found] + [""]


def _missing(data: RunData) -> list[str]:
    lines = ["## What is missing", ""]
    if not data.missing:
        return lines + ["Nothing: every part of the report had its inputs.", ""]
    return lines + [f"- {m}" for m in data.missing] + [""]


def _judge_health(data: RunData, report_dir: Path) -> list[str]:
    lines = ["## Judge health (each model judging its own responses)", ""]
    healthy = [it for it in data.iterations if it.health]
    if not healthy:
        return lines + _not_available("no iter<t>/judgements.jsonl")
    rows, warnings = [], []
    counts = {s.label: s.counts for s in data.stages}
    for it in healthy:
        h = it.health
        forced = counts.get(f"iter{it.number}/judgements", {}).get("forced_score_samples")
        rows.append((f"iter{it.number}", h.get("judged_by", NA), h["num_judgements"],
                     f"{h['sample_failures']}/{h['num_samples']} ({_pct(h['sample_failure_rate'])})",
                     NA if forced is None else f"{forced}/{h['num_samples']}",
                     h["judgements_all_failed"], _pct(h["tie_rate"]),
                     f"{h['prompts_paired']}/{h['num_prompts']}", _num(it.counts.get("pairs")),
                     f"{h['dominant_bucket'] or NA} ({_pct(h['dominant_bucket_frac'])})"))
        warnings += [f"- iter{it.number}: {w}" for w in h.get("warnings", [])]
    lines += _table(["iteration", "judge", "judgements", "failed samples", "forced scores (judge.force_score)",
                     "all samples failed", "tie rate", "prompts paired", "pairs written", "top score (share)"], rows)
    if warnings:
        lines += ["Warnings:", ""] + warnings + [""]
    hists = {it.number: it.health["hist_mean_rounded"] for it in healthy}
    return lines + _image(plots.score_histograms(hists, report_dir / "plots" / "score_histograms.png"),
                          "score histograms", report_dir)


def _pairs(data: RunData, report_dir: Path) -> list[str]:
    lines = ["## Prompts, responses and preference pairs per iteration", ""]
    if not data.iterations:
        return lines + _not_available("no iter<t>/ directories")
    rows = [(f"iter{it.number}", *(_num(it.counts.get(k)) for k in ("prompts", "responses", "judgements", "pairs")))
            for it in data.iterations]
    lines += _table(["iteration", "prompts", "responses", "judgements", "pairs"], rows)
    counts = {it.number: it.counts for it in data.iterations}
    return lines + _image(plots.pairs_per_iteration(counts, report_dir / "plots" / "pairs_per_iteration.png"),
                          "pairs per iteration", report_dir)


def _reward_model(data: RunData, report_dir: Path) -> list[str]:
    lines = ["## Reward-model metrics on the EFT eval split (paper Table 4)", ""]
    ours = [(name, m["reward_model"]) for name, m in data.evals if isinstance(m.get("reward_model"), dict)]
    if not ours:
        return lines + _not_available("no eval/M<t>/metrics.json")
    headers = ["metric"]
    for name, _ in ours:
        headers += [f"{name} (k-mean)", f"{name} (1 sample)"]
    headers += [f"paper {name} (Llama 2 70B)" for name in PAPER_TABLE4]
    rows = []
    for key, label in plots.RM_METRICS:
        row = [label]
        for _, rm in ours:
            row += [_metric(key, rm["k_sample_mean"].get(key)), _metric(key, rm["single_sample"].get(key))]
        rows.append(row + [_metric(key, paper[key]) for paper in PAPER_TABLE4.values()])
    rows.append(["instructions / responses"] + [f"{rm['num_prompts']} / {rm['num_responses']}" for _, rm in ours
                                                 for _ in (0, 1)] + [NA] * len(PAPER_TABLE4))
    rows.append(["judge parse failures"] + [_pct(rm.get("parse_failure_rate")) for _, rm in ours for _ in (0, 1)]
                + [NA] * len(PAPER_TABLE4))
    lines += _table(headers, rows)
    lines += ["The paper's columns are its Llama 2 70B numbers, for reference only. Policies: "
              + str(ours[0][1].get("policy", "see judging/metrics.py")), ""]
    per_model = {name: rm["k_sample_mean"] for name, rm in ours}
    plot = plots.reward_model_metrics_plot(per_model, report_dir / "plots" / "reward_model_metrics.png",
                                           PAPER_TABLE4)
    return lines + _image(plot, "reward-model metrics", report_dir)


def _head_to_head(data: RunData, report_dir: Path) -> list[str]:
    lines = ["## Head-to-head against the previous model (both orders; disagreement = tie)", ""]
    done = [(name, m["head_to_head"]) for name, m in data.evals
            if isinstance(m.get("head_to_head"), dict) and "num_comparisons" in m["head_to_head"]]
    if not done:
        return lines + _not_available("no evaluation with a previous model")
    rows = [(h["candidate"], h["baseline"], h["judge"], h["win"], h["tie"], h["loss"], h["unjudged"],
             _pct(h["win_rate"]), _pct(h["tie_rate"]), _pct(h["loss_rate"])) for _, h in done]
    lines += _table(["model", "vs", "judge", "win", "tie", "loss", "unjudged", "win %", "tie %", "loss %"], rows)
    lines += ["Rates are over judged comparisons; a comparison with an unparsed verdict is unjudged.", ""]
    counts = {f"{h['candidate']} vs {h['baseline']}": h for _, h in done}
    return lines + _image(plots.head_to_head_plot(counts, report_dir / "plots" / "head_to_head.png"),
                          "head-to-head", report_dir)


def _lengths(data: RunData) -> list[str]:
    lines = ["## Answer lengths on the head-to-head prompts", ""]
    rows = [(name, model, s["num_answers"], _num(s["mean_tokens"]), _num(s["mean_chars"]), _pct(s["truncated_frac"]))
            for name, m in data.evals for model, s in (m.get("lengths") or {}).items()]
    if not rows:
        return lines + _not_available("no eval/M<t>/metrics.json")
    return lines + _table(["evaluation", "model", "answers", "mean tokens", "mean chars", "hit max tokens"], rows)


def _training(data: RunData, report_dir: Path, train_rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Training (SFT and DPO loss)", ""]
    if not data.training:
        return lines + _not_available("no metrics.jsonl from SFT/DPO runs")
    lines += _table(["run", "metrics file", "steps", "final loss", "tokens", "tokens/s"],
                    [(r["run"], r["path"], r["steps"], _num(r["final_loss"], 4), _num(r["tokens"]),
                      _num(r["tokens_per_s"])) for r in train_rows])
    curves = {}
    for run in data.training:
        points = [(r["step"], r["loss"]) for r in run.records
                  if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float))]
        if points:
            curves[run.label] = ([p[0] for p in points], [p[1] for p in points])
    return lines + _image(plots.training_loss(curves, report_dir / "plots" / "training_loss.png"),
                          "training loss", report_dir)


def _stage_times(data: RunData, report_dir: Path) -> list[str]:
    lines = ["## Time per stage", ""]
    timed = [s for s in data.stages if s.wall_time_s is not None]
    if not timed:
        return lines + _not_available("no stage manifests with wall_time_s")
    lines += _table(["output", "stage", "wall time (s)", "finished"],
                    [(s.label, s.stage, f"{s.wall_time_s:,.1f}", s.finished_at or NA) for s in timed])
    return lines + _image(plots.stage_times([(s.label, s.wall_time_s) for s in timed],
                                            report_dir / "plots" / "stage_times.png"), "stage times", report_dir)


def _gib(value: Any) -> str:
    return NA if not isinstance(value, (int, float)) else f"{value / 1024**3:.2f}"


def _throughput(gen_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], peak: Peak | None,
                memory: dict[str, Any], stages: list[Any]) -> list[str]:
    lines = ["## Throughput (also in throughput.json)", ""]
    if gen_rows:
        lines += _table(["output", "stage", "requests", "samples", "prefill tokens", "prefill tok/s",
                         "decode tokens", "decode tok/s", "mean decode batch", "output tok/s of stage"],
                        [(r["stage"], r["name"], _num(r["requests"]), _num(r["samples"]), _num(r["prefill_tokens"]),
                          _num(r["prefill_tokens_per_s"]), _num(r["decode_tokens"]), _num(r["decode_tokens_per_s"]),
                          _num(r.get("decode_mean_batch")), _num(r.get("output_tokens_per_stage_s")))
                         for r in gen_rows])
        lines += ["Prefill counts the tokens computed (a prompt shared by its n samples once); the "
                  "mean decode batch is rows per decode step (batches shrink as samples finish).", ""]
    else:
        lines += _not_available("no manifest carries generation-engine statistics")
    if train_rows:
        lines += _table(["training run", "steps", "tokens", "step time (s)", "tokens/s", "attention seq",
                         "GFLOP/token", "model TFLOP/s", "peak TFLOP/s", "MFU"],
                        [(r["run"], r["steps"], _num(r["tokens"]), _num(r["train_time_s"]), _num(r["tokens_per_s"]),
                          _num(r.get("attention_seq_len")),
                          _num(r["flops_per_token"] / 1e9) if r.get("flops_per_token") else NA,
                          _num(r["model_flop_s"] / 1e12) if r.get("model_flop_s") else NA,
                          _num(r["peak_flop_s"] / 1e12) if r.get("peak_flop_s") else NA,
                          _pct(r.get("mfu")) if r.get("mfu") is not None else NA)
                         for r in train_rows])
        halved = "only the causal half of" if CAUSAL_HALVED else "all of"
        lines += [f"MFU: model FLOPs (perf/flops.py, Megatron-LM's formula; {halved} the attention "
                  "scores counted; attention at the mean real sequence length) over "
                  + (f"{peak.source} = {peak.flop_s_per_device / 1e12:.3g} TFLOP/s per device ({peak.device})"
                     if peak else "no peak (see throughput.json)") + ".", ""]
    else:
        lines += _not_available("no training metrics.jsonl")
    rows = [("run (" + ("whole run" if memory.get("covers_run") else "report process only") + ")",
             _gib(memory.get("peak_rss_bytes")), _gib(memory.get("peak_rss_children_bytes")),
             _gib(memory.get("peak_cuda_allocated_bytes")), _gib(memory.get("peak_cuda_reserved_bytes")))]
    rows += [(s.label, _gib(s.memory.get("peak_rss_bytes")), NA, _gib(s.memory.get("peak_cuda_allocated_bytes")),
              _gib(s.memory.get("peak_cuda_reserved_bytes"))) for s in stages if s.memory]
    lines += ["Peak memory (GiB):", ""]
    lines += _table(["scope", "host RSS", "largest child RSS", "CUDA allocated", "CUDA reserved"], rows)
    lines += [f"Run row: {memory.get('scope', NA)}." + ("" if any(s.memory for s in stages) else
              " No stage manifest records its own peak memory."), ""]
    return lines


def _resolve_peak(cfg: Config | None, report_dir: Path, train_rows: list[dict[str, Any]],
                  data: RunData) -> Peak | None:
    if not train_rows:
        return None  # nothing to divide: do not spend a measurement
    try:
        return cached_peak(report_dir / PEAK_CACHE_FILE, cfg.precision.params_dtype if cfg else "float32")
    except (KeyError, ValueError) as err:
        data.missing.append(f"no peak FLOP/s for MFU: {err}")
        return None


# ---------------------------------------------------------------------------------------------


def load_run_config(run_dir: Path) -> Config | None:
    """The run's resolved `config.yaml`, or None when absent or unreadable (the report goes on)."""
    from megatron_selfreward.config import ConfigError, load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except (ConfigError, OSError, ValueError):
        return None


def write_report(cfg: Config | None, run_dir: Path, *, peak: Peak | None = None) -> Path:
    """Write `run_dir/report/` from whatever the run directory holds; returns report.md's path.

    `peak`: the per-device FLOP/s MFU divides by; default: this machine's (perf/accounting.py),
    measured once per run directory on CPU."""
    started = time.time()
    run_dir = Path(run_dir)
    report_dir = run_dir / "report"
    data = collect(cfg, run_dir)
    # The report's own previous manifest is not a stage of the run.
    data.stages = [s for s in data.stages if not s.label.startswith("report/")]
    engines = {s.label: s.engine for s in data.stages if s.engine}
    gen_rows = generation_accounting(generation_throughput(data.stages), engines)
    train_rows = training_throughput(data.training)
    peak = peak or _resolve_peak(cfg, report_dir, train_rows, data)
    train_rows = training_accounting(train_rows, cfg, peak)
    memory = run_memory()
    stage_rows = [{"stage": s.label, "name": s.stage, "wall_time_s": s.wall_time_s,
                   "finished_at": s.finished_at or None, "memory": s.memory} for s in data.stages]
    atomic_write_json(report_dir / "throughput.json", {
        "schema_version": 2, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conventions": conventions(), "peak": asdict(peak) if peak else None,
        "stages": stage_rows, "generation": gen_rows, "training": train_rows,
        "memory": {"run": memory, "stages": {r["stage"]: r["memory"] for r in stage_rows if r["memory"]}}})
    warnings = degenerate_outputs(data)
    lines = _header(data) + _warnings(warnings) + _missing(data)
    lines += _judge_health(data, report_dir) + _pairs(data, report_dir)
    lines += _reward_model(data, report_dir) + _head_to_head(data, report_dir) + _lengths(data)
    lines += _training(data, report_dir, train_rows) + _stage_times(data, report_dir)
    lines += _throughput(gen_rows, train_rows, peak, memory, data.stages)
    out = report_dir / "report.md"
    atomic_write_text(out, "\n".join(lines).rstrip("\n") + "\n")
    write_manifest(out, "report", {"inputs": {}, "params": {}},
                   {"missing": len(data.missing), "plots": len(list((report_dir / "plots").glob("*.png"))),
                    "warnings": warnings},
                   started)
    return out
