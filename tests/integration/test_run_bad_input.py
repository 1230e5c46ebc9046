"""`selfreward run` on bad inputs: clear messages, non-zero exits, nothing trained on nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_selfreward.data.seed import load_builtin_seed
from tests.conftest import REPO
from tests.integration.test_run_tiny import selfreward

BUILTIN = Path(load_builtin_seed.__code__.co_filename).parent / "builtin"


def seed_copy(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in ("ift.jsonl", "ranked.jsonl", "eval_prompts.jsonl"):
        shutil.copyfile(BUILTIN / name, directory / name)
    return directory


def test_empty_seed_file_is_a_clear_error(tmp_path):
    seed = seed_copy(tmp_path / "seed")
    (seed / "ift.jsonl").write_text("")
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={tmp_path / 'run'}", f"data.seed={seed}")
    assert proc.returncode != 0
    assert "ift.jsonl" in proc.stderr and "empty" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "models").exists()  # stopped at the first stage


def test_malformed_jsonl_names_file_and_line(tmp_path):
    seed = seed_copy(tmp_path / "seed")
    lines = (seed / "ift.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "half a record'
    (seed / "ift.jsonl").write_text("\n".join(lines) + "\n")
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={tmp_path / 'run'}", f"data.seed={seed}")
    assert proc.returncode != 0
    assert f"{seed / 'ift.jsonl'} line 3" in proc.stderr and "Traceback" not in proc.stderr


def test_malformed_oasst_export_names_file_and_line(tmp_path):
    export = tmp_path / "export.trees.jsonl"
    lines = (REPO / "tests" / "fixtures" / "oasst_export.trees.jsonl").read_text().splitlines()
    export.write_text("\n".join(lines[:4] + ['{"message_tree_id": "t", "prompt": "not a message"}']) + "\n")
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={tmp_path / 'run'}",
                      f"data.oasst_export={export}")
    assert proc.returncode != 0
    assert f"{export} line 5: expected an OASST message tree" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "seed" / "ift.jsonl").exists()
    assert not (tmp_path / "run" / "models").exists()  # stopped at the first stage


@pytest.mark.slow
def test_zero_pairs_stop_the_run_before_dpo_with_the_judge_failure_counts(tmp_path):
    # A random-init judge never writes "Score: x": every sample fails to parse, no pair is built.
    run_dir = tmp_path / "run"
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={run_dir}", "judge.force_score=false")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "iteration 1" in proc.stderr and "no preference pairs" in proc.stderr
    assert "'missing': 48" in proc.stderr  # 4 prompts x 4 responses x 3 judge samples
    assert (run_dir / "models" / "M1" / "megatron").is_dir()
    assert not (run_dir / "models" / "M2").exists()
    assert not (run_dir / "models" / "M2.manifest.json").exists()


@pytest.mark.slow
def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path):
    # 90 byte tokens: the shorter seed prompts fit, the longer ones and every judge prompt do not.
    run_dir = tmp_path / "run"
    proc = selfreward("run", "--config", "tiny", f"pipeline.run_dir={run_dir}", "model.max_seq_len=90", "sft.seq_len=64",
                      "generation.prompts.num_prompts=12", "judge.force_score=false")
    assert proc.returncode == 3, proc.stderr[-3000:]
    it = run_dir / "iter1"
    sampled = json.loads((it / "responses.manifest.json").read_text())["counts"]
    assert 0 < sampled["prompts_too_long"] < sampled["prompts"] == 12
    assert sampled["responses"] == 4 * (sampled["prompts"] - sampled["prompts_too_long"])
    judged = json.loads((it / "judgements.manifest.json").read_text())["counts"]
    assert judged["too_long_to_judge"] == judged["responses"] == sampled["responses"]
    eft = json.loads((run_dir / "seed" / "eft_train.manifest.json").read_text())["counts"]
    assert eft["prompts_too_long"] == eft["ranked_prompts"] and eft["examples"] == 0
    assert f"too long to judge {sampled['responses']}" in proc.stderr
