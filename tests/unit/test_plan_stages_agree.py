"""The plan decides where a stage writes, and the stage and the executor agree with it.

A stage run through the executor (`run_stage`) with an output renamed in its `StageSpec` writes
there, counts as done there (`stage_done`), and writes nothing at the old path. Every stage name
of the registry has an adapter and a cost, and every plan of every preset names only registered
stages. Seconds: no model is built (the import links a Hugging Face directory).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_selfreward.config import load_config
from megatron_selfreward.pipeline.local import StageContext, run_stage, stage_done
from megatron_selfreward.pipeline.registry import STAGE_KINDS, STAGE_NAMES, adapter_for
from megatron_selfreward.pipeline.schedule import find_stage, plan, spec_fingerprint
from tests.conftest import CONFIGS
from tests.unit.test_input_checks import tiny_cfg, write_hf_dir


def _moved(spec, rename):
    """`spec` with each output at `rename(path)`."""
    return dataclasses.replace(spec, outputs={k: rename(p) for k, p in spec.outputs.items()})


def _run(cfg, spec) -> None:
    assert run_stage(cfg, spec, StageContext(cfg, lambda line: None))


def test_prepare_seed_writes_where_its_spec_says(tmp_path):
    cfg = tiny_cfg(tmp_path / "run")
    planned = find_stage(plan(cfg), "prepare_seed", 0)
    moved = _moved(planned, lambda p: p.parent.parent / "seed_elsewhere" / f"x_{p.name}")
    _run(cfg, moved)
    assert all(p.is_file() for p in moved.outputs.values())
    assert stage_done(moved) and not run_stage(cfg, moved, StageContext(cfg, lambda line: None))
    assert not any(p.exists() for p in planned.outputs.values()) and not stage_done(planned)
    assert not (tmp_path / "run" / "seed").exists()


def test_import_model_writes_where_its_spec_says(tmp_path):
    source = write_hf_dir(tmp_path / "user_model", tiny_cfg(tmp_path))
    cfg = tiny_cfg(tmp_path / "run", "model.source=hf", f"model.path={source}")
    planned = find_stage(plan(cfg), "import_model", 0)
    moved = _moved(planned, lambda p: p.parent / "base_elsewhere")
    _run(cfg, moved)
    assert (moved.output / "hf" / "config.json").is_file() and stage_done(moved)
    manifest = json.loads((moved.output.parent / "base_elsewhere.manifest.json").read_text())
    assert manifest["stage"] == "import_model"
    assert not planned.output.exists() and not stage_done(planned)


def test_build_pairs_writes_where_its_spec_says_with_its_specs_fingerprint(tmp_path):
    from tests.unit.test_pairs_metrics import _iteration_files

    cfg = tiny_cfg(tmp_path / "run")
    planned = find_stage(plan(cfg), "build_pairs", 1)
    (prompts, responses, judgements), *_ = _iteration_files(planned.output.parent.parent / "iter1")
    assert {"prompts": prompts, "responses": responses, "judgements": judgements} == planned.inputs
    moved = _moved(planned, lambda p: p.with_name("pairs_elsewhere.jsonl"))
    _run(cfg, moved)
    manifest = json.loads(moved.output.with_name("pairs_elsewhere.manifest.json").read_text())
    assert manifest["stage"] == "build_pairs" and manifest["counts"]["pairs"] > 10
    assert manifest["fingerprint"] == json.loads(json.dumps(spec_fingerprint(moved), default=str))
    assert stage_done(moved) and not planned.output.exists() and not stage_done(planned)


def test_every_registered_stage_has_an_adapter_and_a_cost():
    assert len(STAGE_NAMES) == len(set(STAGE_NAMES)) == 12
    for name in STAGE_NAMES:
        assert callable(adapter_for(name)), name
        assert STAGE_KINDS[name].cost > 0, name


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
@pytest.mark.parametrize("eft_judge", ["base", "sft_baseline"])
def test_every_planned_stage_is_registered(tmp_path, preset, eft_judge):
    # A random model: the plan then needs no model file (the presets name the user's).
    cfg = load_config(CONFIGS / preset, [f"pipeline.run_dir={tmp_path}", "model.source=random",
                                         f"data.eft_judge={eft_judge}", "pipeline.iterations=2"])
    names = {spec.name for spec in plan(cfg)}
    assert names <= set(STAGE_NAMES)
    assert ("train_sft_baseline" in names) == (eft_judge == "sft_baseline")


def test_a_spec_must_name_a_registered_stage():
    from megatron_selfreward.pipeline.schedule import StageSpec

    with pytest.raises(ValueError, match="not a stage of pipeline/registry.py"):
        StageSpec("train_everything", 0, {}, {})


def test_a_stage_run_hashes_each_input_once(tmp_path, monkeypatch):
    """`run_stage` fingerprints the inputs once and hands that to the stage (at paper scale the
    responses and judgements are hundreds of MB): not again for "done?", the adapter or the
    manifest."""
    from megatron_selfreward.stages import manifest as manifest_module
    from tests.unit.test_pairs_metrics import _iteration_files

    cfg = tiny_cfg(tmp_path / "run")
    spec = find_stage(plan(cfg), "build_pairs", 1)
    _iteration_files(spec.output.parent)
    hashed = []
    real = manifest_module._hash_input
    monkeypatch.setattr(manifest_module, "_hash_input", lambda path: hashed.append(path.name) or real(path))
    _run(cfg, spec)
    assert sorted(hashed) == ["judgements.jsonl", "prompts.jsonl", "responses.jsonl"]
    assert stage_done(spec)
