"""The run report: sections, valid PNGs and throughput.json from a synthetic run directory in
the real file formats; a run directory with pieces missing still gets a report that says so."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from megatron_selfreward.config import load_config, save_resolved
from megatron_selfreward.io import atomic_write_json, write_jsonl
from megatron_selfreward.judging.head_to_head import summarize_outcomes
from megatron_selfreward.judging.parse import judgement_from_outputs
from megatron_selfreward.records import PreferencePair, Prompt, RankedPrompt, Response
from megatron_selfreward.report import PAPER_TABLE4, write_report
from megatron_selfreward.stages.evaluate import (
    judge_health_section,
    lengths_section,
    reward_model_section,
)
from megatron_selfreward.stages.manifest import write_manifest
from tests.conftest import CONFIGS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("# Self-rewarding run report", "## What is missing", "## Judge health",
            "## Prompts, responses and preference pairs per iteration", "## Reward-model metrics",
            "## Head-to-head", "## Answer lengths", "## Training", "## Time per stage", "## Throughput")
# Engine statistics per generating stage: (prefill tokens, prefill s, decode tokens, decode s).
ENGINE = {"responses": (1200, 2.0, 300, 3.0), "judgements": (9000, 4.5, 700, 3.5)}


def _manifest(output: Path, stage: str, wall_s: float, engine: tuple | None = None) -> None:
    extra = {}
    if engine:
        prefill, prefill_s, decode, decode_s = engine
        extra["engine"] = {"requests": 4, "samples": 16, "prefill_tokens_requested": prefill * 2,
                           "prefill_tokens_computed": prefill, "prefill_time_s": prefill_s,
                           "decode_tokens": decode, "decode_time_s": decode_s}
    write_manifest(output, stage, {"inputs": {}, "params": {}}, {"records": 1}, time.time() - wall_s, extra)


def _iteration(run_dir: Path, t: int, scores: list[list[str]]) -> None:
    it = run_dir / f"iter{t}"
    prompts = [Prompt(f"p{i}", f"instruction {i}") for i in range(len(scores) // 2)]
    responses = [Response(f"p{i // 2}", f"p{i // 2}-r{i % 2}", "answer " * (i + 1), i + 1, "eos")
                 for i in range(len(scores))]
    judgements = [judgement_from_outputs(r.prompt_id, r.response_id, outs) for r, outs in zip(responses, scores)]
    pairs = [PreferencePair(p.prompt_id, p.text, "good", "bad", 4.0, 2.0) for p in prompts[:1]]
    for name, records in (("prompts", prompts), ("responses", responses), ("judgements", judgements),
                          ("pairs", pairs)):
        write_jsonl(it / f"{name}.jsonl", records)
        _manifest(it / f"{name}.jsonl", name, 1.0 + t, ENGINE.get(name))


def _training(directory: Path, steps: int, dpo: bool) -> list[dict]:
    records = [{"step": s, "loss": 2.0 / s, "lr": 1e-5, "tokens": 1000 + 10 * s, "step_time_s": 0.5 + 0.1 * s,
                "tokens_per_s": (1000 + 10 * s) / (0.5 + 0.1 * s),
                **({"reward_accuracy": 0.5} if dpo else {"target_tokens": 500.0})} for s in range(1, steps + 1)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _eval_metrics(cfg, run_dir: Path) -> None:
    ranked = [RankedPrompt("e0", "rank these", ["best", "mid", "worst"], [0, 1, 2])]
    rm = [judgement_from_outputs("e0", f"e0-h{i}", [f"Score: {5 - i}", f"Score: {5 - i}"]) for i in range(3)]
    answers = {"M2": [Response("q0", "q0-M2", "long answer", 12, "eos")],
               "M1": [Response("q0", "q0-M1", "short", 4, "length")]}
    metrics = {"schema_version": 1, "model": "M2", "iteration": 2, "previous_model": "M1",
               "reward_model": reward_model_section(ranked, rm),
               "judge_health": judge_health_section(cfg, run_dir, 2),
               "head_to_head": {"candidate": "M2", "baseline": "M1", "judge": "self (M2)", "prompts": 4,
                                **summarize_outcomes(["win", "win", "tie", "unjudged"]), "disagreements": 1},
               "lengths": lengths_section(answers), "files": {}, "wall_time_s": {}}
    atomic_write_json(run_dir / "eval" / "M2" / "metrics.json", metrics)
    _manifest(run_dir / "eval" / "M2" / "metrics.json", "evaluate", 7.0)


@pytest.fixture()
def full_run(tmp_path) -> tuple[Path, dict]:
    run_dir = tmp_path / "run"
    cfg = load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}", "pipeline.iterations=2"])
    save_resolved(cfg, run_dir)
    for name, stage in (("M0", "import_model"), ("M1", "train_sft"), ("M2", "train_dpo")):
        (run_dir / "models" / name).mkdir(parents=True)
        _manifest(run_dir / "models" / name, stage, 5.0)
    _iteration(run_dir, 1, [["Score: 4"], ["Score: 2", "nothing"], ["Score: 3"], ["Score: 3"]])
    _iteration(run_dir, 2, [["Score: 4"]] * 4)
    training = {"SFT -> M1": _training(run_dir / "models" / "M1", 5, dpo=False),
                "DPO -> M2": _training(run_dir / "models" / "M2", 3, dpo=True)}
    _eval_metrics(cfg, run_dir)
    return run_dir, training


def _check_pngs(report: Path) -> set[str]:
    text = report.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for rel in linked:
        data = (report.parent / rel).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, rel
    for png in (report.parent / "plots").glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC)
    return {Path(rel).name for rel in linked}


def test_report_sections_plots_and_paper_reference(full_run):
    run_dir, _ = full_run
    report = write_report(load_config(run_dir / "config.yaml"), run_dir)
    assert report == run_dir / "report" / "report.md"
    text = report.read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "Nothing: every part of the report had its inputs." in text
    assert "| model | tiny (random) |" in text and "2 planned; found 1, 2" in text
    assert _check_pngs(report) == {"score_histograms.png", "pairs_per_iteration.png", "reward_model_metrics.png",
                                   "head_to_head.png", "training_loss.png", "stage_times.png"}
    # Table 4 for reference, labelled as the paper's 70B numbers.
    assert "paper M1 (Llama 2 70B)" in text and "78.7%" in text and "81.7%" in text
    assert PAPER_TABLE4["M3"]["pairwise_accuracy"] == 0.817
    # The synthetic judge ranks e0's responses perfectly.
    assert "| pairwise acc. | 100.0% | 100.0% |" in text
    # iter2: every mean is 4, a collapsed judge; iter1: one failed sample of 5.
    assert "iter2: score bucket 4 holds 100.0%" in text
    assert "| iter1 | M1 | 4 | 1/5 (20.0%) |" in text
    assert "| M2 | M1 | self (M2) | 2 | 1 | 0 | 1 | 66.7% | 33.3% | 0.0% |" in text
    assert "| M2 | M2 | 1 | 12 | 11 | 0.0% |" in text


def test_throughput_json_matches_the_inputs(full_run):
    run_dir, training = full_run
    write_report(None, run_dir)
    tp = json.loads((run_dir / "report" / "throughput.json").read_text())
    gen = {row["stage"]: row for row in tp["generation"]}
    assert set(gen) == {f"iter{t}/{name}" for t in (1, 2) for name in ENGINE}
    for t in (1, 2):
        for name, (prefill, prefill_s, decode, decode_s) in ENGINE.items():
            row = gen[f"iter{t}/{name}"]
            assert (row["prefill_tokens"], row["decode_tokens"]) == (prefill, decode)
            assert row["prefill_tokens_per_s"] == pytest.approx(prefill / prefill_s)
            assert row["decode_tokens_per_s"] == pytest.approx(decode / decode_s)
            assert row["wall_time_s"] == pytest.approx(1.0 + t, abs=0.05)
    train = {row["run"]: row for row in tp["training"]}
    assert set(train) == set(training)
    for label, records in training.items():
        tokens = sum(r["tokens"] for r in records)
        seconds = sum(r["step_time_s"] for r in records)
        assert train[label]["steps"] == len(records)
        assert train[label]["tokens"] == tokens
        assert train[label]["tokens_per_s"] == pytest.approx(tokens / seconds)
        assert train[label]["final_loss"] == records[-1]["loss"]


def test_report_of_a_run_with_missing_pieces_says_what_is_missing(tmp_path):
    run_dir = tmp_path / "partial"
    write_jsonl(run_dir / "iter1" / "prompts.jsonl", [Prompt("p0", "hello")])
    (run_dir / "eval" / "M2").mkdir(parents=True)
    (run_dir / "eval" / "M2" / "metrics.json").write_text("{ not json")
    (run_dir / "eval" / "M3").mkdir(parents=True)  # evaluation started, not finished
    report = write_report(None, run_dir)
    text = report.read_text()
    for section in SECTIONS:
        assert section in text
    missing = text.split("## What is missing")[1].split("\n## ")[0]
    assert "config.yaml" in missing
    assert "iter1: no responses.jsonl, judgements.jsonl, pairs.jsonl" in missing
    assert "eval/M2/metrics.json is unreadable" in missing
    assert "eval/M3/metrics.json: evaluation of M3 not finished" in missing
    assert "no training metrics.jsonl" in missing
    assert text.count("_Not available:") >= 5
    assert _check_pngs(report) == {"pairs_per_iteration.png"}
    tp = json.loads((run_dir / "report" / "throughput.json").read_text())
    assert (tp["generation"], tp["training"], tp["stages"], tp["peak"]) == ([], [], [], None)
    assert not (run_dir / "report" / "peak_flops.json").exists()  # no training: nothing measured


def test_report_of_an_empty_run_dir_and_the_cli(tmp_path, capsys):
    from megatron_selfreward.cli import main

    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report" / "report.md")
    text = (run_dir / "report" / "report.md").read_text()
    assert "no iter<t>/ directories" in text and "no stage manifests" in text
    assert main(["report", "--run-dir", str(tmp_path / "nowhere")]) == 2


# Tiny preset by hand (L 2, h 64, f 160, 4 heads of 16, 2 KV groups, V 512): GEMM parameters per
# layer Q 64x64 + O 64x64 + K,V 2 x 64x32 + MLP 3 x 64x160 = 43,008; x 2 layers + output 64x512
# -> N = 118,784, 6 N = 712,704; causal-halved attention 12 L h s / 2 = 768 s.
def tiny_flops_per_token(seq_len: float) -> float:
    return 712_704 + 768 * seq_len


def test_training_mfu_and_generation_accounting_by_hand(full_run):
    from megatron_selfreward.perf.accounting import Peak

    run_dir, training = full_run
    peak = Peak("cpu", 2.0e9, "float32", "given", "host", 1, "now")
    write_report(load_config(run_dir / "config.yaml"), run_dir, peak=peak)
    tp = json.loads((run_dir / "report" / "throughput.json").read_text())
    assert tp["conventions"]["causal_attention_halved"] is True
    assert tp["peak"]["flop_s_per_device"] == 2.0e9 and tp["peak"]["source"] == "given"
    train = {row["run"]: row for row in tp["training"]}
    # tiny: global batch 4, seq_len 128. SFT: 5150 tokens / (5 steps x 4) = 257.5 -> capped at 128;
    # DPO: 3060 tokens / (3 steps x 4 pairs x 2 sequences) = 127.5.
    for label, sequences, seq in (("SFT -> M1", 4, 128.0), ("DPO -> M2", 8, 127.5)):
        records, row = training[label], train[label]
        tokens = sum(r["tokens"] for r in records)
        seconds = sum(r["step_time_s"] for r in records)
        assert row["attention_seq_len"] == pytest.approx(min(tokens / (len(records) * sequences), 128))
        assert row["attention_seq_len"] == pytest.approx(seq)
        assert row["flops_per_token"] == pytest.approx(tiny_flops_per_token(seq))
        assert row["mfu"] == pytest.approx(tokens / seconds * tiny_flops_per_token(seq) / 2.0e9)
        assert row["peak_devices"] == 1
    gen = {row["stage"]: row for row in tp["generation"]}
    for t in (1, 2):
        row = gen[f"iter{t}/responses"]
        prefill, prefill_s, decode, decode_s = ENGINE["responses"]
        assert row["engine_time_s"] == pytest.approx(prefill_s + decode_s)
        assert row["output_tokens_per_engine_s"] == pytest.approx(decode / (prefill_s + decode_s))
        assert row["output_tokens_per_stage_s"] == pytest.approx(decode / row["wall_time_s"])
    stages = {row["stage"]: row for row in tp["stages"]}
    assert stages["iter1/responses"]["wall_time_s"] == pytest.approx(2.0, abs=0.05)
    assert stages["models/M1"]["name"] == "train_sft"
    text = (run_dir / "report" / "report.md").read_text()
    assert "only the causal half of the attention scores" in text and "| MFU |" in text
    assert "Peak memory (GiB)" in text


def test_peak_is_measured_once_per_run_dir(tmp_path):
    from megatron_selfreward.perf.accounting import cached_peak

    calls = []

    def fake_measure(**kwargs):
        calls.append(kwargs)
        return 1.0e9 * len(calls)

    cache = tmp_path / "report" / "peak_flops.json"
    first = cached_peak(cache, "bfloat16", measure=fake_measure)
    again = cached_peak(cache, "bfloat16", measure=fake_measure)
    assert first == again and first.flop_s_per_device == 1.0e9 and len(calls) == 1
    assert calls[0]["dtype"] is __import__("torch").bfloat16
    other = cached_peak(cache, "float32", measure=fake_measure)  # another dtype: measured anew
    assert other.flop_s_per_device == 2.0e9 and other.dtype == "float32"


def _eft_manifest(run_dir: Path, examples: int, failures: dict[str, int], samples: int = 36) -> None:
    write_manifest(run_dir / "seed" / "eft_train.jsonl", "build_eft", {"inputs": {}, "params": {}},
                   {"ranked_prompts": 12, "judge_samples": samples, "examples": examples,
                    "parse_failures": failures}, time.time() - 1.0,
                   {"precision": {"params_dtype": "float32", "choice": "auto: CPU 'AMD EPYC' has no native bf16"}})


def _warnings_section(text: str) -> str:
    return text.split("## Warnings: degenerate outputs")[1].split("\n## ")[0]


def test_report_warns_in_words_about_degenerate_outputs(full_run):
    run_dir, _ = full_run
    _eft_manifest(run_dir, examples=0, failures={"out_of_range": 20, "missing": 2})
    # iter3: half of the judge samples unparsed, and no pair at all.
    _iteration(run_dir, 3, [["Score: 4", "Score: 9"], ["no score", "Score: 2"]])
    write_jsonl(run_dir / "iter3" / "pairs.jsonl", [])
    text = write_report(load_config(run_dir / "config.yaml"), run_dir).read_text()
    warnings = _warnings_section(text)
    assert "build_eft wrote 0 EFT examples from 12 ranked prompts" in warnings
    assert "build_eft: 22 of 36 judge samples had no parseable score (61% > 30%)" in warnings
    assert "iter1: only 1 preference pairs (fewer than 32)" in warnings
    assert "iter3: only 0 preference pairs" in warnings
    assert "iter3: 2 of 4 judge samples had no parseable score (50% > 30%)" in warnings
    assert "iter1: 1 of 5" not in warnings  # 20%: under the threshold
    assert "DPO -> M2: 3 optimizer step(s) (fewer than 4)" in warnings
    assert "SFT -> M1" not in warnings  # 5 steps
    # The precision the stages ran with, from their manifests.
    assert "| precision | float32 (auto: CPU 'AMD EPYC' has no native bf16) |" in text


def test_report_of_a_healthy_run_has_no_warnings(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}"])
    save_resolved(cfg, run_dir)
    _eft_manifest(run_dir, examples=9, failures={"out_of_range": 3})
    scores = [[f"Score: {1 + i % 2 * 3}"] for i in range(80)]
    _iteration(run_dir, 1, scores)
    prompts = [Prompt(f"p{i}", f"instruction {i}") for i in range(40)]
    write_jsonl(run_dir / "iter1" / "pairs.jsonl",
                [PreferencePair(p.prompt_id, p.text, "good", "bad", 4.0, 1.0) for p in prompts])
    _training(run_dir / "models" / "M1", 6, dpo=False)
    _training(run_dir / "models" / "M2", 4, dpo=True)
    text = write_report(cfg, run_dir).read_text()
    assert "None: every stage's output has the size and quality the checks ask for." in _warnings_section(text)
