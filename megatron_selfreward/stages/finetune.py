"""Stages `train_sft` (M0 -> M1 on IFT + EFT) and `train_dpo` (M_t -> M_{t+1} on AIFT(M_t)).

Each trains straight into the next model directory, `models/M<k>/`: `megatron/` (the final
weights), `tokenizer/` (copied from the init model), `metrics.jsonl`, `summary.json`, and while
running `checkpoints/` (full training state, removed once the stage is finished unless
`pipeline.keep_train_checkpoints`). An interrupted stage resumes from its newest checkpoint;
a directory left by different inputs (`fingerprint.json` differs) is cleared first, because
resuming it would train on a mix of two data sets.

train_dpo refuses to start on zero usable pairs: the message names the iteration and the judge's
failure counts, since a judge that never emits "Score: x" (or always the same score) is the
usual cause.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config
from megatron_selfreward.errors import StageError
from megatron_selfreward.io import atomic_write_json, read_records
from megatron_selfreward.records import SFTExample
from megatron_selfreward.stages.manifest import manifest_path

FINGERPRINT_FILE = "fingerprint.json"


def prepare_out_dir(out: Path, fp: dict[str, Any]) -> None:
    """Keep a partial training directory only if it was started for exactly these inputs."""
    marker = out / FINGERPRINT_FILE
    want = json.loads(json.dumps(fp, sort_keys=True, default=str))
    try:
        same = json.loads(marker.read_text()) == want
    except (FileNotFoundError, json.JSONDecodeError):
        same = False
    if not same and out.exists():
        shutil.rmtree(out)
    if not same:
        atomic_write_json(marker, want)


def _finish(cfg: Config, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    if not summary["finished"]:
        raise StageError(f"training into {out} stopped at step {summary['steps']} of "
                         f"{summary['total_steps']}; rerun to resume")
    if not cfg.pipeline.keep_train_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    final = summary.get("final") or {}
    return {"steps": summary["steps"], "final_loss": final.get("loss"), "data": summary["data"],
            "train_time_s": round(summary["train_time_s"], 1),
            "tokens_per_s": round(summary["tokens_per_s"], 1)}


def run_train_sft(cfg: Config, data: dict[str, Path], init_dir: Path | None, out: Path,
                  fp: dict[str, Any] | None) -> dict[str, Any]:
    """SFT from `init_dir` on the union of the SFTExample files in `data` (e.g. ift, eft_train).

    `fp`: the stage fingerprint for `prepare_out_dir`; None when the launching process did that.
    """
    from megatron_selfreward.train import run_sft

    examples: list[SFTExample] = []
    counts = {}
    for name, path in data.items():
        part = read_records(path, SFTExample)
        counts[f"{name}_examples"] = len(part)
        examples += part
    if not examples:
        raise StageError(f"SFT into {out}: no examples in {', '.join(map(str, data.values()))}")
    if fp is not None:
        prepare_out_dir(out, fp)
    summary = run_sft(cfg, examples, init_dir, out, source=", ".join(map(str, data.values())))
    return {**counts, **_finish(cfg, summary, out)}


def _no_pairs_message(iteration: int, pairs_path: Path, why: str) -> str:
    counts: dict[str, Any] = {}
    for name in ("judgements", "pairs"):
        path = manifest_path(pairs_path.with_name(f"{name}.jsonl"))
        if path.is_file():
            counts[name] = json.loads(path.read_text()).get("counts", {})
    judge = counts.get("judgements", {})
    return (f"iteration {iteration}: {why}, so M{iteration + 1} is not trained. "
            f"Judge: {judge.get('responses', '?')} responses, {judge.get('judge_samples', '?')} samples, "
            f"parse failures {judge.get('parse_failures', {})}, too long to judge "
            f"{judge.get('too_long_to_judge', 0)}; pairs dropped "
            f"{counts.get('pairs', {}).get('dropped', {})} (see {pairs_path.parent}). "
            "A judge that never writes 'Score: x', or gives every response the same score, yields "
            "no pairs: more EFT data, more judge samples or more responses per prompt help.")


def run_train_dpo(cfg: Config, iteration: int, pairs_path: Path, init_dir: Path, out: Path,
                  fp: dict[str, Any] | None) -> dict[str, Any]:
    from megatron_selfreward.data.dpo_batches import read_pairs
    from megatron_selfreward.train import prepare_dpo_data, run_dpo

    pairs = read_pairs(pairs_path)
    if not pairs:
        raise StageError(_no_pairs_message(iteration, pairs_path, f"{pairs_path} holds no preference pairs"))
    # Tokenised once, here: the refusal below needs the length stats, and run_dpo trains on them.
    data = prepare_dpo_data(cfg, pairs, init_dir)
    if data.stats.kept == 0:
        raise StageError(_no_pairs_message(
            iteration, pairs_path, f"all {len(pairs)} pairs have a prompt longer than dpo.seq_len "
            f"{cfg.dpo.seq_len}"))
    if fp is not None:  # only now: a refused stage leaves no model directory behind
        prepare_out_dir(out, fp)
    summary = run_dpo(cfg, pairs, init_dir, out, source=str(pairs_path), data=data)
    return {"pairs": len(pairs), **_finish(cfg, summary, out)}
