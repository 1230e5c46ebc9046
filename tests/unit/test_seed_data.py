"""Seed data: the built-in seed, seed directories, the OASST recipes, EFT building, AlpacaEval."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import random
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from megatron_selfreward.data import alpaca_eval, oasst
from megatron_selfreward.data.seed import (
    EVAL_PROMPTS_FILE,
    IFT_FILE,
    RANKED_FILE,
    SeedError,
    load_builtin_seed,
    load_seed_dir,
    normalize_instruction,
    split_ranked,
)
from megatron_selfreward.io import JsonlError, write_jsonl
from megatron_selfreward.judging.prompt import render_judge_prompt
from megatron_selfreward.records import Prompt, RankedPrompt, RecordError, SFTExample

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "oasst_small.trees.jsonl"


# ---------------------------------------------------------------------------
# Built-in seed


@pytest.fixture(scope="module")
def builtin():
    return load_builtin_seed()


def test_builtin_seed_sizes_and_shapes(builtin):
    assert len(builtin.ift) >= 64
    assert len(builtin.ranked) >= 32
    assert len(builtin.eval_prompts) >= 24
    for ex in builtin.ift:
        assert [m["role"] for m in ex.messages] == ["user", "assistant"]
        assert 10 <= len(ex.messages[1]["content"].split()) <= 160
    for rp in builtin.ranked:
        assert len(rp.responses) >= 3
        assert len(set(rp.responses)) == len(rp.responses)
    # Shuffled: a judge that always favours the first response must not look good.
    assert len({rp.human_ranks.index(0) for rp in builtin.ranked}) >= 3


def test_builtin_records_round_trip_and_ids_unique(builtin):
    for ex in builtin.ift:
        assert SFTExample.from_dict(ex.to_dict()) == ex
    for rp in builtin.ranked:
        assert RankedPrompt.from_dict(rp.to_dict()) == rp
    for p in builtin.eval_prompts:
        assert Prompt.from_dict(p.to_dict()) == p
    for ids in ([r.prompt_id for r in builtin.ranked], [p.prompt_id for p in builtin.eval_prompts],
                [e.meta["id"] for e in builtin.ift]):
        assert len(set(ids)) == len(ids)


def test_builtin_eval_prompts_are_held_out(builtin):
    trained = {normalize_instruction(e.messages[0]["content"]) for e in builtin.ift}
    ranked = {normalize_instruction(r.prompt) for r in builtin.ranked}
    held_out = {normalize_instruction(p.text) for p in builtin.eval_prompts}
    assert len(trained) == len(builtin.ift)
    assert not held_out & trained
    assert not held_out & ranked


def test_builtin_files_ship_with_the_package():
    from importlib import resources
    builtin_dir = resources.files("megatron_selfreward.data").joinpath("builtin")
    for name in (IFT_FILE, RANKED_FILE, EVAL_PROMPTS_FILE, "README.md"):
        assert builtin_dir.joinpath(name).is_file(), name
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"data/builtin/*.jsonl"' in text and '"data/builtin/*.md"' in text


# ---------------------------------------------------------------------------
# Seed directories


def _write_seed(tmp_path: Path, builtin, **override) -> Path:
    files = {IFT_FILE: builtin.ift[:3], RANKED_FILE: builtin.ranked[:3], EVAL_PROMPTS_FILE: builtin.eval_prompts[:3]}
    files.update(override)
    for name, records in files.items():
        if records is not None:
            write_jsonl(tmp_path / name, records)
    return tmp_path


def test_load_seed_dir_round_trip(tmp_path, builtin):
    seed = load_seed_dir(_write_seed(tmp_path, builtin))
    assert seed.ift == builtin.ift[:3] and seed.ranked == builtin.ranked[:3]
    assert seed.eval_prompts == builtin.eval_prompts[:3]


def test_load_seed_dir_missing_and_empty_files(tmp_path, builtin):
    with pytest.raises(SeedError, match="seed directory not found"):
        load_seed_dir(tmp_path / "nope")
    _write_seed(tmp_path, builtin, **{RANKED_FILE: None})
    with pytest.raises(SeedError, match=r"ranked\.jsonl: seed file not found; expected RankedPrompt"):
        load_seed_dir(tmp_path)
    (tmp_path / RANKED_FILE).write_text("\n\n")
    with pytest.raises(SeedError, match=r"ranked\.jsonl: seed file is empty; expected RankedPrompt"):
        load_seed_dir(tmp_path)


def test_load_seed_dir_bad_lines_name_file_and_line(tmp_path, builtin):
    _write_seed(tmp_path, builtin)
    path = tmp_path / IFT_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + ['{"messages": [{"role": "user", "content": "hi"}]}'] + lines[2:]) + "\n")
    with pytest.raises(RecordError, match=r"ift\.jsonl line 2: field 'messages' must end with an assistant turn"):
        load_seed_dir(tmp_path)
    path.write_text("\n".join(lines[:2] + ["{not json"]) + "\n")
    with pytest.raises(JsonlError, match=r"ift\.jsonl line 3: invalid JSON"):
        load_seed_dir(tmp_path)


def test_load_seed_dir_rejects_duplicates_and_leaked_eval_prompts(tmp_path, builtin):
    _write_seed(tmp_path, builtin, **{RANKED_FILE: [builtin.ranked[0], builtin.ranked[0]]})
    with pytest.raises(SeedError, match="appears more than once"):
        load_seed_dir(tmp_path)
    leaked = Prompt(prompt_id="x", text="  " + builtin.ift[1].messages[0]["content"].upper())
    _write_seed(tmp_path, builtin, **{EVAL_PROMPTS_FILE: [leaked]})
    with pytest.raises(SeedError, match="must be held out"):
        load_seed_dir(tmp_path)


# ---------------------------------------------------------------------------
# split_ranked


def _ranked(n: int) -> list[RankedPrompt]:
    return [RankedPrompt(prompt_id=f"p{i}", prompt=f"q{i}", responses=["a", "b"], human_ranks=[0, 1])
            for i in range(n)]


def test_split_ranked_is_deterministic_and_order_free():
    prompts = _ranked(40)
    train, held_out = split_ranked(prompts, 0.25, seed=3)
    assert len(held_out) == 10 and len(train) == 30
    assert {r.prompt_id for r in train} | {r.prompt_id for r in held_out} == {r.prompt_id for r in prompts}
    assert split_ranked(prompts, 0.25, seed=3) == (train, held_out)
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    assert {r.prompt_id for r in split_ranked(shuffled, 0.25, seed=3)[1]} == {r.prompt_id for r in held_out}
    assert train == [r for r in prompts if r in train]  # input order kept
    assert {r.prompt_id for r in split_ranked(prompts, 0.25, seed=4)[1]} != {r.prompt_id for r in held_out}


def test_split_ranked_edges():
    assert split_ranked(_ranked(5), 0.0) == (_ranked(5), [])
    assert split_ranked(_ranked(5), 1.0) == ([], _ranked(5))
    train, held_out = split_ranked(_ranked(3), 0.01)
    assert len(held_out) == 1 and len(train) == 2  # a tiny seed still gets an eval prompt
    with pytest.raises(ValueError, match="eval_fraction"):
        split_ranked(_ranked(3), 1.5)
    with pytest.raises(ValueError, match="unique"):
        split_ranked(_ranked(2) * 2, 0.5)


# ---------------------------------------------------------------------------
# OASST recipes


def _trees():
    return list(oasst.iter_trees(FIXTURE))


def _by_tree(records):
    return {r.meta["message_tree_id"]: r for r in records}


def test_oasst_ift_takes_english_rank0_first_turns():
    stats = Counter()
    ift = oasst.build_ift(_trees(), ift_fraction=1.0, stats=stats)
    by_tree = _by_tree(ift)
    assert sorted(by_tree) == ["t1", "t11", "t2", "t8"]
    assert by_tree["t1"].messages == [
        {"role": "user", "content": "What is the tallest mountain in the world?"},
        {"role": "assistant", "content": "Mount Everest, at 8,849 m above sea level, is the tallest mountain on Earth."},
    ]
    assert by_tree["t2"].messages[1]["content"] == "Joyful."
    dump = json.dumps([e.to_dict() for e in ift])
    assert "K2, at 8,611 m" not in dump and "And the second tallest" not in dump  # first turns only
    # t4's rank-0 reply was deleted: skipped, not replaced by the runner-up.
    assert stats["ift_best_reply_filtered"] == 1
    expected = {"prompt_not_english": 1, "tree_not_ready": 1, "tied_human_ranks": 1, "no_ranked_reply": 1,
                "prompt_deleted": 1, "duplicate_prompt": 1, "reply_deleted": 1, "reply_failed_review": 1,
                "reply_not_english": 1, "reply_unranked": 3, "ift_examples": 4, "ranked_prompts": 0}
    assert {k: stats[k] for k in expected} == expected


def test_oasst_ranked_keeps_human_ranks_renumbered():
    ift, ranked = oasst.build_seed(_trees(), ift_fraction=0.0)
    assert [e.meta["message_tree_id"] for e in ift] == ["t2"]  # one ranked reply: IFT only
    by_tree = _by_tree(ranked)
    assert sorted(by_tree) == ["t1", "t11", "t4", "t8"]
    t1 = by_tree["t1"]
    assert t1.prompt_id == "oasst-t1"
    assert t1.responses == ["Mount Everest is very tall.",
                            "Mount Everest, at 8,849 m above sea level, is the tallest mountain on Earth.",
                            "The Alps."]
    assert t1.human_ranks == [1, 0, 2]
    assert by_tree["t4"].human_ranks == [0, 1] and by_tree["t4"].meta["oasst_ranks"] == [1, 2]
    assert by_tree["t8"].responses[1] == "A word." and by_tree["t8"].human_ranks == [0, 1]


def test_oasst_ift_and_ranked_never_overlap():
    for fraction in (0.0, 0.3, oasst.IFT_FRACTION, 1.0):
        ift = oasst.build_ift(_trees(), ift_fraction=fraction)
        ranked = oasst.build_ranked(_trees(), ift_fraction=fraction)
        assert (ift, ranked) == oasst.build_seed(_trees(), ift_fraction=fraction)
        ift_prompts = {normalize_instruction(e.messages[0]["content"]) for e in ift}
        assert not ift_prompts & {normalize_instruction(r.prompt) for r in ranked}
        assert not {e.meta["message_tree_id"] for e in ift} & {r.meta["message_tree_id"] for r in ranked}


def test_oasst_reads_gzip(tmp_path):
    gz = tmp_path / "export.trees.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(FIXTURE.read_bytes())
    assert list(oasst.iter_trees(gz)) == _trees()


def test_oasst_malformed_lines_name_file_and_line(tmp_path):
    lines = FIXTURE.read_text().splitlines()
    bad = tmp_path / "bad.trees.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"message_tree_id": "x", "prompt": {'] + lines[2:]) + "\n")
    stream = oasst.iter_trees(bad)
    assert next(stream)["message_tree_id"] == "t1"  # streams: lines before the bad one are usable
    with pytest.raises(JsonlError, match=r"bad\.trees\.jsonl line 3: invalid JSON"):
        list(stream)
    bad.write_text("\n".join(lines[:1] + ['{"message_id": "m", "parent_id": null, "text": "hi"}']) + "\n")
    with pytest.raises(JsonlError, match=r"line 2: this is a flat message record; pass the \*\.trees"):
        list(oasst.iter_trees(bad))
    tree = json.loads(lines[0])
    tree["prompt"]["replies"][0]["rank"] = "first"
    bad.write_text(json.dumps(tree) + "\n")
    with pytest.raises(JsonlError, match=r"line 1: prompt\.replies\[0\]\.rank must be"):
        list(oasst.iter_trees(bad))


# ---------------------------------------------------------------------------
# EFT


def _judge(scores: dict[str, str]):
    """A scripted judge: the output depends only on the response text."""
    calls = []

    def judge_fn(prompt: str, response: str) -> str:
        calls.append((prompt, response))
        return scores[response]

    judge_fn.calls = calls  # type: ignore[attr-defined]
    return judge_fn


def test_order_agreement():
    assert oasst.order_agreement([5, 3, 1], [0, 1, 2]) is None
    assert oasst.order_agreement([1, 5, 3], [2, 0, 1]) is None
    assert oasst.order_agreement([3, 5, 1], [0, 1, 2]) == "disagrees_with_human"
    assert oasst.order_agreement([4, 4, 1], [0, 1, 2]) == "tied_scores"
    assert oasst.order_agreement([4, 4, 5], [0, 1, 2]) == "disagrees_with_human"


def test_build_eft_keeps_only_agreeing_prompts():
    ranked = [
        RankedPrompt("agree", "Q1", ["ok", "best", "bad"], [1, 0, 2]),
        RankedPrompt("disagree", "Q2", ["d-best", "d-worst"], [0, 1]),
        RankedPrompt("tie", "Q3", ["t-best", "t-mid", "t-worst"], [0, 1, 2]),
        RankedPrompt("unparsable", "Q4", ["u-best", "u-worst"], [0, 1]),
    ]
    judge = _judge({
        "best": "Thorough and accurate. Score: 5", "ok": "Partly right. Score: 3", "bad": "Wrong. Score: 1",
        "d-best": "Meh. Score: 2", "d-worst": "Great. Score: 4",
        "t-best": "Score: 4", "t-mid": "Score: 4", "t-worst": "Score: 2",
        "u-best": "I would give it full marks.", "u-worst": "Score: 9",
    })
    examples, stats = oasst.build_eft(ranked, judge, random.Random(0), max_bucket_fraction=1.0)
    assert len(judge.calls) == 10 and ("Q1", "best") in judge.calls
    assert [e.meta["prompt_id"] for e in examples] == ["agree"] * 3
    assert examples[1].messages == [
        {"role": "user", "content": render_judge_prompt("Q1", "best")},
        {"role": "assistant", "content": "Thorough and accurate. Score: 5"},
    ]
    assert [e.meta["score"] for e in examples] == [3.0, 5.0, 1.0]
    assert stats.prompts_in == 4 and stats.prompts_kept == 1
    assert stats.rejected == {"disagrees_with_human": 1, "tied_scores": 1, "parse_failure": 1}
    assert stats.parse_failures == {"missing": 1, "out_of_range": 1}
    assert stats.score_histogram == {"1": 1, "3": 1, "5": 1}
    json.dumps(stats.to_dict())


def test_rebalance_caps_the_most_common_score():
    scores = [4.0] * 60 + [5.0] * 20 + [3.0] * 20
    keep, feasible = oasst.rebalance_scores(scores, 0.4, random.Random(1))
    kept = Counter(scores[i] for i in keep)
    assert feasible and kept == {4.0: 26, 5.0: 20, 3.0: 20}
    assert max(kept.values()) <= 0.4 * len(keep)
    assert keep == oasst.rebalance_scores(scores, 0.4, random.Random(1))[0]
    assert keep != oasst.rebalance_scores(scores, 0.4, random.Random(2))[0]
    # Two distinct scores can never both be <= 40%: keep everything and say so.
    assert oasst.rebalance_scores([4.0] * 5 + [5.0], 0.4, random.Random(0)) == (list(range(6)), False)
    with pytest.raises(ValueError, match="max_bucket_fraction"):
        oasst.rebalance_scores(scores, 0.0, random.Random(0))


def test_build_eft_bucket_cap_is_deterministic():
    ranked, outputs = [], {}
    for i, (hi, lo) in enumerate([(5, 4)] * 4 + [(4, 3)] * 3 + [(4, 2)] * 3):
        ranked.append(RankedPrompt(f"p{i}", f"Q{i}", [f"lo{i}", f"hi{i}"], [1, 0]))
        outputs[f"hi{i}"], outputs[f"lo{i}"] = f"Good. Score: {hi}", f"Weaker. Score: {lo}"
    examples, stats = oasst.build_eft(ranked, _judge(outputs), random.Random(7), max_bucket_fraction=0.4)
    assert stats.examples_before_rebalance == 20 and stats.dropped_by_rebalance == 4
    assert stats.score_histogram == {"2": 3, "3": 3, "4": 6, "5": 4}
    assert max(stats.score_histogram.values()) <= 0.4 * len(examples)
    again, _ = oasst.build_eft(ranked, _judge(outputs), random.Random(7), max_bucket_fraction=0.4)
    assert again == examples
    order = [(e.meta["prompt_id"], e.meta["response_index"]) for e in examples]
    assert order == sorted(order, key=lambda k: (int(k[0][1:]), k[1]))  # input order kept


# ---------------------------------------------------------------------------
# AlpacaEval


def _fake_sdist(path: Path, entries, member="alpaca_eval-0.6.6/example/outputs.json", symlink=False) -> Path:
    data = json.dumps(entries).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        if symlink:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _entries(n=805):
    return [{"instruction": f"Instruction {i}", "dataset": "helpful_base", "output": "x"} for i in range(n)]


def _no_subprocess(*args, **kwargs):
    raise AssertionError("subprocess.run must not be called")


def test_alpaca_eval_from_local_sdist_then_cache(tmp_path, monkeypatch):
    sdist = _fake_sdist(tmp_path / "alpaca_eval-0.6.6.tar.gz", _entries())
    prompts = alpaca_eval.load_alpaca_eval(tmp_path / "cache", sdist=sdist)
    assert len(prompts) == 805 and prompts[3].prompt_id == "alpaca_eval-003"
    assert prompts[3].text == "Instruction 3" and prompts[3].meta == {"dataset": "helpful_base"}
    monkeypatch.setattr(alpaca_eval.subprocess, "run", _no_subprocess)
    assert alpaca_eval.load_alpaca_eval(tmp_path / "cache") == prompts


def test_alpaca_eval_rejects_bad_sdists(tmp_path):
    with pytest.raises(alpaca_eval.AlpacaEvalError, match="expected a list of 805 entries, got 804"):
        alpaca_eval.prompts_from_sdist(_fake_sdist(tmp_path / "a.tar.gz", _entries(804)))
    with pytest.raises(alpaca_eval.AlpacaEvalError, match="has no"):
        alpaca_eval.prompts_from_sdist(_fake_sdist(tmp_path / "b.tar.gz", _entries(), member="../example/outputs.json"))
    with pytest.raises(alpaca_eval.AlpacaEvalError, match="not a regular file"):
        alpaca_eval.prompts_from_sdist(_fake_sdist(tmp_path / "c.tar.gz", _entries(), symlink=True))
    broken = _entries()
    del broken[10]["dataset"]
    with pytest.raises(alpaca_eval.AlpacaEvalError, match="entry 10 lacks"):
        alpaca_eval.prompts_from_sdist(_fake_sdist(tmp_path / "d.tar.gz", broken))


def test_alpaca_eval_pip_failure_says_what_to_run(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert isinstance(cmd, list) and kwargs.get("shell") is not True
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(alpaca_eval.subprocess, "run", failing_pip)
    with pytest.raises(alpaca_eval.AlpacaEvalError, match=r"(?s)exited 1.*network unreachable.*pip download --no-deps"):
        alpaca_eval.load_alpaca_eval(tmp_path)
    assert not (tmp_path / alpaca_eval.CACHE_FILE).exists()


@pytest.mark.slow
def test_alpaca_eval_real_download_then_cache(tmp_path, monkeypatch):
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this interpreter")
    prompts = alpaca_eval.load_alpaca_eval(tmp_path)
    assert len(prompts) == 805
    assert len({p.text for p in prompts}) == 805
    assert set(Counter(p.meta["dataset"] for p in prompts)) == {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"}
    monkeypatch.setattr(alpaca_eval.subprocess, "run", _no_subprocess)
    assert alpaca_eval.load_alpaca_eval(tmp_path) == prompts
