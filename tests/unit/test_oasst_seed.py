"""`data.oasst_export`: the paper's seed built from an Open Assistant export, in the run's
`prepare_seed` stage, by `tools/build_oasst_seed.py` and by `selfreward seed oasst`.

The fixture `oasst_export.trees.jsonl` is in the export's own format (every field a real
`*.trees.jsonl` message carries: ids, parent ids, dates, labels, emojis, nested replies) with
English trees on both sides of the IFT/ranked split, a Spanish tree, a deleted rank-0 reply, an
unranked and a failed-review reply, an unfinished tree, a follow-up turn, and one prompt that is
also a built-in eval prompt.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from megatron_selfreward.config import ConfigError, load_config
from megatron_selfreward.data import oasst
from megatron_selfreward.data.seed import SeedError, load_builtin_seed, load_seed_dir, normalize_instruction
from megatron_selfreward.io import JsonlError, read_jsonl, read_records
from megatron_selfreward.pipeline.local import StageContext, run_stage, stage_done
from megatron_selfreward.pipeline.schedule import find_stage, plan, spec_fingerprint
from megatron_selfreward.records import RankedPrompt, SFTExample
from tests.conftest import CONFIGS, REPO

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPORT = FIXTURES / "oasst_export.trees.jsonl"
# What the fixture yields by the paper's rules (see the module docstring).
IFT_PROMPTS = {"Why does Earth have seasons?", "Can you suggest a name for a small bakery that sells sourdough bread?",
               "What are the health benefits of drinking green tea?",
               "How can I make my houseplants grow better in winter?",
               "Summarize the plot of Romeo and Juliet in two sentences."}
RANKED_PROMPTS = {"What is the easiest way to reverse a list in Python?",
                  "Explain the difference between weather and climate.",
                  "What is a good way to start learning to play the guitar?"}
OVERLAP_PROMPT = "Write a short poem about a lighthouse keeper."


def _tree_ids() -> set[str]:
    return {json.loads(line)["message_tree_id"] for line in EXPORT.read_text().splitlines()}


def _cfg(run_dir: Path, *overrides: str):
    return load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}", *overrides])


def _prepare(cfg) -> tuple[object, list[str]]:
    """Run the plan's prepare_seed spec through the local executor, as `selfreward run` does."""
    spec = find_stage(plan(cfg), "prepare_seed", 0)
    lines: list[str] = []
    assert run_stage(cfg, spec, StageContext(cfg, lines.append))
    return spec, lines


def _bad_export(tmp_path: Path) -> Path:
    lines = EXPORT.read_text().splitlines()
    bad = tmp_path / "bad.trees.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"message_tree_id": "x", "prompt": {"text": "cut'] + lines[2:]) + "\n")
    return bad


def load_tool():
    path = REPO / "tools" / "build_oasst_seed.py"
    spec = importlib.util.spec_from_file_location("build_oasst_seed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# The run's prepare_seed stage


def test_prepare_seed_builds_the_seed_from_the_export(tmp_path):
    cfg = _cfg(tmp_path / "run", f"data.oasst_export={EXPORT}")
    spec, lines = _prepare(cfg)
    seed_dir = tmp_path / "run" / "seed"
    ift = read_records(seed_dir / "ift.jsonl", SFTExample)
    assert {e.messages[0]["content"] for e in ift} == IFT_PROMPTS
    assert all(e.meta["source"] == "oasst" and e.meta["message_tree_id"] in _tree_ids() for e in ift)
    ranked = (read_records(seed_dir / "ranked_train.jsonl", RankedPrompt)
              + read_records(seed_dir / "eft_eval.jsonl", RankedPrompt))
    assert {r.prompt for r in ranked} == RANKED_PROMPTS
    # The deleted rank-0 reply is gone and the human order of the rest is kept, renumbered.
    python = next(r for r in ranked if "reverse a list" in r.prompt)
    assert python.human_ranks == [0, 1] and python.meta["oasst_ranks"] == [1, 2]
    # OASST has no held-out instruction set: the built-in eval prompts, with training kept off them.
    builtin = load_builtin_seed()
    assert read_jsonl(seed_dir / "eval_prompts.jsonl") == [p.to_dict() for p in builtin.eval_prompts]
    assert OVERLAP_PROMPT in {p.text for p in builtin.eval_prompts} and OVERLAP_PROMPT not in IFT_PROMPTS
    # None of it is the built-in seed's training data; first turns only.
    assert not {normalize_instruction(p) for p in IFT_PROMPTS | RANKED_PROMPTS} & (
        {normalize_instruction(e.messages[0]["content"]) for e in builtin.ift}
        | {normalize_instruction(r.prompt) for r in builtin.ranked})
    assert "reversed in Australia" not in (seed_dir / "ift.jsonl").read_text()

    counts = json.loads((seed_dir / "ift.manifest.json").read_text())["counts"]
    assert (counts["ift"], counts["ranked_train"] + counts["eft_eval"]) == (5, 3)
    assert counts["eft_eval"] >= 1 and counts["ranked_train"] >= 1
    assert counts["source"] == "oasst" and counts["paper_sizes"] == {"ift": 3200, "eft_train": 1630, "eft_eval": 541}
    assert counts["oasst_skipped"] == {"eval_overlap": 1, "prompt_not_english": 1, "reply_deleted": 1,
                                       "reply_failed_review": 1, "reply_unranked": 1, "tree_not_ready": 1}
    [line] = [x for x in lines if "OASST seed" in x]
    assert str(EXPORT) in line and "5 IFT examples (paper 3,200)" in line
    assert f"{counts['ranked_train']} train / {counts['eft_eval']} eval" in line and "1,630" in line and "541" in line
    assert spec.inputs["oasst_export"] == EXPORT


def test_a_changed_export_reruns_prepare_seed(tmp_path):
    export = tmp_path / "export.trees.jsonl"
    export.write_bytes(EXPORT.read_bytes())
    cfg = _cfg(tmp_path / "run", f"data.oasst_export={export}")
    spec, _ = _prepare(cfg)
    before = spec_fingerprint(spec)
    assert stage_done(spec)
    builtin = find_stage(plan(_cfg(tmp_path / "run")), "prepare_seed", 0)
    assert spec_fingerprint(builtin) != before  # switching to the built-in seed reruns too

    lines = export.read_text().splitlines()
    export.write_text("\n".join(lines[:-1]) + "\n")  # a re-download with one tree fewer
    spec = find_stage(plan(cfg), "prepare_seed", 0)
    assert spec_fingerprint(spec) != before and not stage_done(spec)
    _prepare(cfg)
    ift = read_records(tmp_path / "run" / "seed" / "ift.jsonl", SFTExample)
    assert "Summarize the plot of Romeo and Juliet in two sentences." not in {e.messages[0]["content"] for e in ift}


def test_malformed_export_names_file_and_line_and_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path / "run", f"data.oasst_export={_bad_export(tmp_path)}")
    with pytest.raises(JsonlError, match=r"bad\.trees\.jsonl line 3: invalid JSON") as err:
        _prepare(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "seed").exists()


def test_truncated_gzip_export_is_a_clear_error(tmp_path):
    gz = tmp_path / "export.trees.jsonl.gz"
    gz.write_bytes(gzip.compress(EXPORT.read_bytes())[:-200])
    cfg = _cfg(tmp_path / "run", f"data.oasst_export={gz}")
    with pytest.raises(JsonlError, match=r"export\.trees\.jsonl\.gz line \d+: cannot read file: truncated or "
                                         r"corrupt gzip data"):
        _prepare(cfg)
    whole = tmp_path / "whole.trees.jsonl.gz"
    whole.write_bytes(gzip.compress(EXPORT.read_bytes()))
    _prepare(_cfg(tmp_path / "run", f"data.oasst_export={whole}"))
    assert len(read_jsonl(tmp_path / "run" / "seed" / "ift.jsonl")) == 5


def test_export_config_is_checked_and_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.oasst_export': set data.oasst_export or data.seed, not both"):
        _cfg(tmp_path, f"data.oasst_export={EXPORT}", f"data.seed={tmp_path}")
    with pytest.raises(ConfigError, match=r"'data.oasst_export': '.*\.parquet' is not a \.jsonl or \.jsonl\.gz"):
        _cfg(tmp_path, "data.oasst_export=train-00000.parquet")
    with pytest.raises(ConfigError, match=r"'data.oasst_export': .*missing\.trees\.jsonl\.gz does not exist"):
        plan(_cfg(tmp_path, f"data.oasst_export={tmp_path / 'missing.trees.jsonl.gz'}"))


def test_an_export_too_small_for_eft_is_refused_with_its_skip_counts(tmp_path):
    # The recipe fixture has a single prompt on the ranked side: nothing to hold out for eval.
    with pytest.raises(SeedError, match=r"oasst_small\.trees\.jsonl: 1 prompt\(s\) with 2 or more usable ranked "
                                        r"replies; EFT needs at least 2 .*skipped: .*prompt_not_english 1"):
        oasst.load_oasst_seed(FIXTURES / "oasst_small.trees.jsonl", load_builtin_seed().eval_prompts)
    empty = tmp_path / "empty.trees.jsonl"
    empty.write_text("")
    with pytest.raises(SeedError, match=r"empty\.trees\.jsonl: no usable IFT example .*skipped: nothing"):
        _prepare(_cfg(tmp_path / "run", f"data.oasst_export={empty}"))


# ---------------------------------------------------------------------------------------------
# The seed alone: tools/build_oasst_seed.py and `selfreward seed oasst`


def test_tool_writes_a_seed_directory_that_data_seed_reads(tmp_path, capsys):
    tool, out = load_tool(), tmp_path / "seed"
    assert tool.main([str(EXPORT), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 IFT examples (paper 3,200)" in printed and "3 ranked prompts" in printed
    assert "1,630 train / 541 eval" in printed and "eval_overlap 1" in printed
    seed = load_seed_dir(out)
    assert {e.messages[0]["content"] for e in seed.ift} == IFT_PROMPTS
    assert {r.prompt for r in seed.ranked} == RANKED_PROMPTS
    assert seed.eval_prompts == load_builtin_seed().eval_prompts

    (out / "eval_prompts.jsonl").write_text('{"prompt_id": "mine", "text": "My own prompt."}\n')
    assert tool.main([str(EXPORT), str(out)]) == 1  # a hand-edited seed is not overwritten silently
    assert "already holds" in capsys.readouterr().err
    assert load_seed_dir(out).eval_prompts[0].prompt_id == "mine"
    assert tool.main([str(EXPORT), str(out), "--overwrite"]) == 0


def test_tool_reports_a_malformed_export_by_file_and_line(tmp_path, capsys):
    tool = load_tool()
    assert tool.main([str(_bad_export(tmp_path)), str(tmp_path / "seed")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.trees.jsonl line 3: invalid JSON" in err and err.count("\n") == 1
    assert not (tmp_path / "seed").exists()
    assert tool.main([str(tmp_path / "absent.trees.jsonl"), str(tmp_path / "seed")]) == 1
    assert "absent.trees.jsonl: no such file" in capsys.readouterr().err


def test_cli_seed_subcommand_builds_the_same_directory(tmp_path, capsys):
    from megatron_selfreward.cli import main

    assert main(["seed", "oasst", str(EXPORT), str(tmp_path / "seed")]) == 0
    assert "5 IFT examples (paper 3,200)" in capsys.readouterr().out
    assert {e.messages[0]["content"] for e in load_seed_dir(tmp_path / "seed").ift} == IFT_PROMPTS


def test_a_tree_without_ids_names_file_and_line(tmp_path):
    """A tree with neither message_tree_id nor prompt.message_id cannot be split by id: the
    error names the file and line (it was a bare ValueError, a traceback from the CLI)."""
    lines = EXPORT.read_text().splitlines()
    tree = json.loads(lines[1])
    tree.pop("message_tree_id", None)
    tree["prompt"].pop("message_id", None)
    export = tmp_path / "noids.trees.jsonl"
    export.write_text("\n".join([lines[0], json.dumps(tree), *lines[2:]]) + "\n")
    with pytest.raises(JsonlError, match=r"noids\.trees\.jsonl line 2: .*neither message_tree_id nor "
                                         r"prompt\.message_id"):
        _prepare(_cfg(tmp_path / "run", f"data.oasst_export={export}"))
    assert not (tmp_path / "run" / "seed").exists()
