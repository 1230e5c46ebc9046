"""Read a run directory into plain numbers for the report, tolerating whatever is absent.

A run may be finished, interrupted, or still going; every reader here skips a missing or
unreadable file and says so in `RunData.missing` instead of raising, so a report can always be
written and tells the reader what it could not show.

Where things live (`pipeline/schedule.py`): `iter<t>/{prompts,responses,judgements,pairs}.jsonl`,
`eval/M<t>/metrics.json`, training `metrics.jsonl` in the model directory it trained
(`models/M<k>/`; older layouts: `train/<stage>/`, `train_<task>/`), and a `*.manifest.json`
next to every stage output (wall time, counts, engine statistics).
"""

from __future__ import annotations

import calendar
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config
from megatron_selfreward.io import count_records, read_jsonl

__all__ = ["IterationData", "TrainingRun", "StageTiming", "RunData", "collect", "generation_throughput",
           "training_throughput"]

_ITER = re.compile(r"iter(\d+)$")
_MODEL = re.compile(r"M(\d+)$")
_TRAIN_GLOBS = ("models/*/metrics.jsonl", "train/*/metrics.jsonl", "train_*/metrics.jsonl",
                "iter*/train_*/metrics.jsonl")
_RECORD_FILES = ("prompts", "responses", "judgements", "pairs")


@dataclass
class IterationData:
    number: int
    counts: dict[str, int | None]  # records per file; None = file absent
    health: dict[str, Any] | None  # judge_health of judgements.jsonl; None = absent/unreadable


@dataclass
class TrainingRun:
    label: str  # "SFT -> M1", "DPO -> M2", or the directory
    path: str  # relative to the run dir
    records: list[dict[str, Any]]


@dataclass
class StageTiming:
    label: str  # the output it belongs to, e.g. "iter1/responses"
    stage: str
    wall_time_s: float | None
    engine: dict[str, Any] | None
    counts: dict[str, Any]
    finished_at: str = ""
    memory: dict[str, Any] | None = None  # the manifest's peak memory, when its writer recorded it
    precision: dict[str, Any] | None = None  # the weight dtype the stage ran with, and why

    @property
    def finished_epoch_s(self) -> float | None:
        try:
            return float(calendar.timegm(time.strptime(self.finished_at, "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError:
            return None

    @property
    def started_epoch_s(self) -> float | None:
        finished = self.finished_epoch_s
        return None if finished is None else finished - (self.wall_time_s or 0.0)


@dataclass
class RunData:
    run_dir: Path
    cfg: Config | None
    iterations: list[IterationData] = field(default_factory=list)
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    training: list[TrainingRun] = field(default_factory=list)
    stages: list[StageTiming] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _numbered(paths: list[Path], pattern: re.Pattern) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in paths if (m := pattern.match(p.name))]
    return sorted(found)


def _rel(run_dir: Path, path: Path) -> str:
    return str(path.relative_to(run_dir))


def _read_json(path: Path, data: RunData) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        data.missing.append(f"{_rel(data.run_dir, path)} is unreadable ({type(err).__name__}: {err})")
        return None


def _count_lines(path: Path, data: RunData) -> int | None:
    if not path.is_file():
        return None
    try:
        return count_records(path)  # streamed: stage files reach hundreds of MB at paper scale
    except (OSError, ValueError) as err:
        data.missing.append(f"{_rel(data.run_dir, path)} is unreadable ({err})")
        return None


def _iteration(data: RunData, number: int, directory: Path) -> IterationData:
    from megatron_selfreward.stages.evaluate import iteration_judge_health

    counts = {name: _count_lines(directory / f"{name}.jsonl", data) for name in _RECORD_FILES}
    health = None
    if counts["judgements"] is not None:
        low, high = (data.cfg.judge.score_low, data.cfg.judge.score_high) if data.cfg else (0.0, 5.0)
        try:
            health = iteration_judge_health(data.run_dir, number, low, high)
        except (OSError, ValueError) as err:
            data.missing.append(f"iter{number}/judgements.jsonl is unreadable ({err})")
    absent = [f"{name}.jsonl" for name, n in counts.items() if n is None]
    if absent:
        data.missing.append(f"iter{number}: no {', '.join(absent)} (not run yet, or interrupted)")
    return IterationData(number, counts, health)


def _training_label(run_dir: Path, path: Path, records: list[dict[str, Any]]) -> str:
    kind = "DPO" if any("reward_accuracy" in r for r in records[:1]) else "SFT"
    directory = path.parent
    if directory.parent.name == "models":
        return f"{kind} -> {directory.name}"
    return f"{kind} ({_rel(run_dir, directory)})"


def _training(data: RunData) -> None:
    seen: set[Path] = set()
    for pattern in _TRAIN_GLOBS:
        for path in sorted(data.run_dir.glob(pattern)):
            if path in seen:
                continue
            seen.add(path)
            try:
                records = read_jsonl(path)
            except (OSError, ValueError) as err:
                data.missing.append(f"{_rel(data.run_dir, path)} is unreadable ({err})")
                continue
            if records:
                label = _training_label(data.run_dir, path, records)
                data.training.append(TrainingRun(label, _rel(data.run_dir, path), records))
    if not data.training:
        data.missing.append("no training metrics.jsonl (models/M<k>/metrics.jsonl): no loss curves, "
                            "no training throughput")


def _stages(data: RunData) -> None:
    for path in sorted(data.run_dir.rglob("*.manifest.json")):
        manifest = _read_json(path, data)
        if not isinstance(manifest, dict):
            continue
        label = _rel(data.run_dir, path)[: -len(".manifest.json")]
        engine, memory, precision = manifest.get("engine"), manifest.get("memory"), manifest.get("precision")
        data.stages.append(StageTiming(
            label=label, stage=str(manifest.get("stage", "?")),
            wall_time_s=manifest.get("wall_time_s") if isinstance(manifest.get("wall_time_s"), (int, float)) else None,
            engine=engine if isinstance(engine, dict) and engine else None,
            counts=manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {},
            finished_at=str(manifest.get("finished_at", "")),
            memory=memory if isinstance(memory, dict) and memory else None,
            precision=precision if isinstance(precision, dict) and precision else None))
    # Run order by start (finish - wall time): finish times have 1 s resolution, and a stage
    # with sub-stages (evaluate) starts before them though it finishes after.
    data.stages.sort(key=lambda s: (s.started_epoch_s or 0.0, s.label))
    if not data.stages:
        data.missing.append("no stage manifests (*.manifest.json): no stage times, no generation throughput")


def collect(cfg: Config | None, run_dir: Path) -> RunData:
    """Everything the report shows, read from `run_dir`; `missing` lists what was not there."""
    data = RunData(run_dir=Path(run_dir), cfg=cfg)
    if cfg is None:
        data.missing.append("config.yaml: not found or invalid; defaults assumed (score range 0-5)")
    for number, directory in _numbered([p for p in data.run_dir.glob("iter*") if p.is_dir()], _ITER):
        data.iterations.append(_iteration(data, number, directory))
    if not data.iterations:
        data.missing.append("no iter<t>/ directories: no judge health, score histograms or pairs")
    for _, directory in _numbered([p for p in data.run_dir.glob("eval/M*") if p.is_dir()], _MODEL):
        path = directory / "metrics.json"
        if not path.is_file():
            data.missing.append(f"{_rel(data.run_dir, path)}: evaluation of {directory.name} not finished")
            continue
        metrics = _read_json(path, data)
        if isinstance(metrics, dict):
            data.evals.append((directory.name, metrics))
    if not data.evals:
        data.missing.append("no eval/M<t>/metrics.json: no reward-model metrics, head-to-head or lengths")
    data.models = [p.name for _, p in _numbered([p for p in data.run_dir.glob("models/M*") if p.is_dir()], _MODEL)]
    _training(data)
    _stages(data)
    return data


def _rate(tokens: float | None, seconds: float | None) -> float | None:
    if tokens is None or not seconds:
        return None
    return tokens / seconds


def generation_throughput(stages: list[StageTiming]) -> list[dict[str, Any]]:
    """Prefill and decode tokens/s of every stage whose manifest carries engine statistics.

    Prefill counts the tokens actually computed (shared prompt prefixes are computed once)."""
    rows = []
    for s in stages:
        if s.engine is None:
            continue
        e = s.engine
        prefill = e.get("prefill_tokens_computed", e.get("prefill_tokens"))
        rows.append({
            "stage": s.label, "name": s.stage, "requests": e.get("requests"), "samples": e.get("samples"),
            "prefill_tokens": prefill, "prefill_time_s": e.get("prefill_time_s"),
            "prefill_tokens_per_s": _rate(prefill, e.get("prefill_time_s")),
            "decode_tokens": e.get("decode_tokens"), "decode_time_s": e.get("decode_time_s"),
            "decode_tokens_per_s": _rate(e.get("decode_tokens"), e.get("decode_time_s")),
            "wall_time_s": s.wall_time_s,
        })
    return rows


def training_throughput(runs: list[TrainingRun]) -> list[dict[str, Any]]:
    """Tokens per second of each training run: all tokens over all step time (resumes included)."""
    rows = []
    for run in runs:
        tokens = sum(float(r.get("tokens", 0) or 0) for r in run.records)
        seconds = sum(float(r.get("step_time_s", 0) or 0) for r in run.records)
        losses = [r["loss"] for r in run.records if isinstance(r.get("loss"), (int, float))]
        rows.append({"run": run.label, "path": run.path, "steps": len(run.records), "tokens": tokens,
                     "train_time_s": seconds, "tokens_per_s": _rate(tokens, seconds),
                     "final_loss": losses[-1] if losses else None})
    return rows
