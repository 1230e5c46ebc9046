"""The plan: the iteration schedule as data, every input made by an earlier stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_selfreward.config import ConfigError, load_config
from megatron_selfreward.pipeline.schedule import STAGE_NAMES, find_stage, plan, spec_fingerprint
from tests.conftest import CONFIGS


def _plan(*overrides: str, run_dir: Path = Path("/tmp/plan_test")):
    return plan(load_config(CONFIGS / "tiny.yaml", [f"pipeline.run_dir={run_dir}", *overrides]))


def test_two_iterations_expand_in_paper_order():
    names = [(s.name, s.iteration) for s in _plan("pipeline.iterations=2")]
    loop = ["generate_prompts", "sample_responses", "judge_responses", "build_pairs", "train_dpo"]
    head = [("prepare_seed", 0), ("import_model", 0), ("build_eft", 0), ("train_sft", 0), ("evaluate", 1)]
    assert names[:5] == head
    assert names[5:11] == [(n, 1) for n in loop] + [("evaluate", 2)]
    assert names[11:17] == [(n, 2) for n in loop] + [("evaluate", 3)]
    assert all(name in STAGE_NAMES for name, _ in names)


def test_every_input_inside_the_run_is_an_earlier_output(tmp_path):
    stages = _plan("pipeline.iterations=2", run_dir=tmp_path)
    made: set[Path] = set()
    for spec in stages:
        for name, path in spec.inputs.items():
            if tmp_path in path.parents:
                assert path in made, f"{spec.label} reads {name}={path} before any stage writes it"
        made.update(spec.outputs.values())


def test_dpo_initialises_from_the_model_it_judged_with_and_writes_the_next():
    stages = _plan("pipeline.iterations=2")
    for t in (1, 2):
        dpo, judge = find_stage(stages, "train_dpo", t), find_stage(stages, "judge_responses", t)
        assert dpo.inputs["init"] == judge.inputs["model"] == Path(f"/tmp/plan_test/models/M{t}")
        assert dpo.output == Path(f"/tmp/plan_test/models/M{t + 1}") and dpo.distributed


def test_evaluate_is_labelled_by_the_model_it_scores():
    stages = _plan("pipeline.iterations=1")
    evaluate = find_stage(stages, "evaluate", 2)
    assert evaluate.inputs["model"] == Path("/tmp/plan_test/models/M2")
    assert evaluate.label == "evaluate (M2)" and find_stage(stages, "train_dpo", 1).label == "train_dpo (iteration 1)"


def test_sft_baseline_option_adds_a_stage_that_writes_the_eft_judge():
    stages = _plan("data.eft_judge=sft_baseline")
    baseline, eft = find_stage(stages, "train_sft_baseline", 0), find_stage(stages, "build_eft", 0)
    assert eft.inputs["model"] == baseline.output and set(baseline.inputs) == {"ift", "init"}


def test_later_iterations_dedup_against_earlier_prompts():
    spec = find_stage(_plan("pipeline.iterations=3"), "generate_prompts", 3)
    assert sorted(k for k in spec.inputs if k.startswith("prompts_iter")) == ["prompts_iter1", "prompts_iter2"]


def test_fingerprint_follows_the_stage_params(tmp_path):
    a = find_stage(_plan(run_dir=tmp_path), "judge_responses", 1)
    b = find_stage(_plan("judge.temperature=0.5", run_dir=tmp_path), "judge_responses", 1)
    c = find_stage(_plan("dpo.beta=0.5", run_dir=tmp_path), "judge_responses", 1)
    for spec in (a, b, c):
        for path in spec.inputs.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x") if not path.exists() else None
    assert spec_fingerprint(a) != spec_fingerprint(b)
    assert spec_fingerprint(a) == spec_fingerprint(c)


def test_unknown_stage_names_the_plan():
    with pytest.raises(ConfigError, match="train_dpo --iteration 1"):
        find_stage(_plan(), "train_dpo", 5)
