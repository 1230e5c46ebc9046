"""The iteration schedule as data: `plan(cfg)` expands a config into an ordered list of stages.

Each `StageSpec` names a stage (a name of `pipeline/registry.py`), the iteration it belongs to,
the files it reads and writes, whether it is a multi-process (torchrun / srun) job, and the config
values its result depends on (`params`, from `pipeline/params.py`). Executors (`pipeline/local.py`,
`pipeline/slurm.py`) run the list in order and hand each stage function the paths and the
fingerprint of its spec; nothing decides the schedule, or a stage's paths, anywhere else. A stage
is done when the manifest next to its first output matches `spec_fingerprint(spec)`.

    prepare_seed -> import_model(M0) -> [train_sft_baseline] -> build_eft -> train_sft(M1)
        -> evaluate(M1)
    for t in 1..T: generate_prompts -> sample_responses -> judge_responses -> build_pairs
                   -> train_dpo(M_{t+1}) -> evaluate(M_{t+1})
    report

`evaluate` (stages/evaluate.py) reports on each new model against the one before it; `report`
(megatron_selfreward/report/) writes the run's report last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_selfreward.config import Config, ConfigError
from megatron_selfreward.data.oasst import IFT_FRACTION
from megatron_selfreward.pipeline.params import (
    evaluate_params,
    import_params,
    judge_params,
    optim_params,
    prompt_params,
    sampling_params,
)
from megatron_selfreward.pipeline.registry import STAGE_KINDS, STAGE_NAMES
from megatron_selfreward.stages.manifest import fingerprint, listing_digest, manifest_path

__all__ = ["SEED_FILES", "STAGE_NAMES", "StageSpec", "find_stage", "iter_dir", "model_dir", "plan",
           "spec_fingerprint"]

SEED_FILES = ("ift", "ranked_train", "eft_eval", "eval_prompts")


@dataclass(frozen=True)
class StageSpec:
    name: str
    iteration: int
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    distributed: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    # Other paths the stage uses, named here so it decides none: files it derives when an input
    # is absent, intermediate files it shares with other stages. Neither fingerprinted nor
    # needed for "done".
    aux: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in STAGE_KINDS:
            raise ValueError(f"StageSpec {self.name!r}: not a stage of pipeline/registry.py "
                             f"(one of {', '.join(STAGE_NAMES)})")

    @property
    def output(self) -> Path:
        """The main output: its manifest marks the stage done."""
        return next(iter(self.outputs.values()))

    @property
    def label(self) -> str:
        if self.name == "evaluate":  # its number is the model's index, not an iteration
            return f"evaluate (M{self.iteration})"
        return f"{self.name} (iteration {self.iteration})" if self.iteration else self.name


def model_dir(run_dir: Path, index: int) -> Path:
    return run_dir / "models" / f"M{index}"


def iter_dir(run_dir: Path, t: int) -> Path:
    return run_dir / f"iter{t}"


def spec_fingerprint(spec: StageSpec) -> dict[str, Any]:
    """Content hashes of the inputs + params. A model directory of the run counts by its
    manifest (which fingerprints how it was made); a directory from outside the run (a user's
    seed or generator model) by its file listing, not by hashing gigabytes of weights."""
    inputs, listings = {}, {}
    for name, path in spec.inputs.items():
        manifest = manifest_path(path)
        if path.is_dir() and manifest.is_file():
            inputs[name] = manifest
        elif path.is_dir():
            listings[name] = listing_digest(path)
        else:
            inputs[name] = path
    params = {**spec.params, "input_dir_listings": listings} if listings else spec.params
    return fingerprint(inputs, params)


# ---------------------------------------------------------------------------------------------
# The stages (their parameters: pipeline/params.py)


def _import_spec(cfg: Config, run_dir: Path) -> StageSpec:
    source, inputs, params = import_params(cfg)
    aux = {"source": source} if source is not None else {}
    return StageSpec("import_model", 0, inputs, {"model": model_dir(run_dir, 0)}, params=params, aux=aux)


def _eft_judge_dir(cfg: Config, run_dir: Path) -> Path:
    choice = cfg.data.eft_judge
    if choice == "base":
        return model_dir(run_dir, 0)
    if choice == "sft_baseline":
        return run_dir / "models" / "SFT"
    path = Path(choice).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key 'data.eft_judge': {path} is not a model directory "
                          "(use 'base', 'sft_baseline' or a dir with megatron/ or hf/)")
    return path


def _seed_stages(cfg: Config, run_dir: Path) -> list[StageSpec]:
    seed = run_dir / "seed"
    d = cfg.data
    files = {name: seed / f"{name}.jsonl" for name in SEED_FILES}
    source = Path(d.seed).expanduser() if d.seed != "builtin" else None
    inputs: dict[str, Path] = {"seed": source} if source else {}
    params: dict[str, Any] = {"seed": d.seed, "eft_eval_fraction": d.eft_eval_fraction,
                              "split_seed": cfg.pipeline.seed}
    if d.oasst_export:
        export = Path(d.oasst_export).expanduser()
        if not export.is_file():
            problem = "is a directory" if export.is_dir() else "does not exist"
            raise ConfigError(f"config key 'data.oasst_export': {export} {problem} (give the Open "
                              "Assistant *.trees.jsonl or *.trees.jsonl.gz export file)")
        # An input, hashed by content: an edited or re-downloaded export rebuilds the seed.
        inputs["oasst_export"] = export
        params["oasst_ift_fraction"] = IFT_FRACTION
    prepare = StageSpec("prepare_seed", 0, inputs, files, params=params)
    stages = [prepare, _import_spec(cfg, run_dir)]
    m0, judge = model_dir(run_dir, 0), _eft_judge_dir(cfg, run_dir)
    sft = optim_params(cfg, "sft")
    if d.eft_judge == "sft_baseline":
        stages.append(StageSpec("train_sft_baseline", 0, {"ift": files["ift"], "init": m0},
                                {"model": judge}, distributed=True, params=sft))
    stages.append(StageSpec(
        "build_eft", 0, {"ranked_train": files["ranked_train"], "model": judge},
        {"eft_train": seed / "eft_train.jsonl"},
        params={**judge_params(cfg), "k": 1, "max_prompts": d.eft_max_prompts,
                "max_bucket_fraction": d.eft_max_bucket_fraction}))
    stages.append(StageSpec("train_sft", 0, {"ift": files["ift"], "eft_train": seed / "eft_train.jsonl",
                                             "init": m0},
                            {"model": model_dir(run_dir, 1)}, distributed=True, params=sft))
    # M1 is evaluated too (against M0): the paper's Table 4 starts from M1's judging ability.
    stages.append(_evaluate_spec(cfg, run_dir, 1))
    return stages


def _iteration_stages(cfg: Config, run_dir: Path, t: int) -> list[StageSpec]:
    it, model = iter_dir(run_dir, t), model_dir(run_dir, t)
    prompts, responses = it / "prompts.jsonl", it / "responses.jsonl"
    judgements, pairs = it / "judgements.jsonl", it / "pairs.jsonl"
    gen = cfg.generation.prompts.generator
    generator = model if gen == "self" else Path(gen).expanduser()
    earlier = {f"prompts_iter{s}": iter_dir(run_dir, s) / "prompts.jsonl" for s in range(1, t)}
    stages = [
        StageSpec("generate_prompts", t, {"ift": run_dir / "seed" / "ift.jsonl", "generator": generator,
                                          **earlier},
                  {"prompts": prompts}, params=prompt_params(cfg)),
        StageSpec("sample_responses", t, {"prompts": prompts, "model": model}, {"responses": responses},
                  params=sampling_params(cfg)),
        StageSpec("judge_responses", t, {"prompts": prompts, "responses": responses, "model": model},
                  {"judgements": judgements}, params=judge_params(cfg)),
        StageSpec("build_pairs", t, {"prompts": prompts, "responses": responses,
                                     "judgements": judgements}, {"pairs": pairs}),
        StageSpec("train_dpo", t, {"pairs": pairs, "init": model}, {"model": model_dir(run_dir, t + 1)},
                  distributed=True, params=optim_params(cfg, "dpo")),
    ]
    stages.append(_evaluate_spec(cfg, run_dir, t + 1))
    return stages


def _evaluate_spec(cfg: Config, run_dir: Path, index: int) -> StageSpec:
    """metrics.json of M<index>; beside it the stage's rm_judgements.jsonl and head_to_head.jsonl.
    Its answers go to eval/answers/ (shared: M_t's answers serve M_{t+1}'s comparison too); a run
    without a prepared seed gets its held-out split and prompts derived into eval/inputs/."""
    seed, evals = run_dir / "seed", run_dir / "eval"
    prompts = seed / "eval_prompts.jsonl"
    if cfg.data.eval_prompts == "alpaca_eval":
        from megatron_selfreward.data.alpaca_eval import CACHE_FILE

        prompts = seed / CACHE_FILE
    inputs = {"model": model_dir(run_dir, index), "eft_eval": seed / "eft_eval.jsonl", "eval_prompts": prompts}
    if index > 0:
        inputs["prev_model"] = model_dir(run_dir, index - 1)
    aux = {"run_dir": run_dir, "answers": evals / "answers",
           "derived_eft_eval": evals / "inputs" / "eft_eval.jsonl",
           "derived_eval_prompts": evals / "inputs" / "eval_prompts.jsonl"}
    return StageSpec("evaluate", index, inputs, {"metrics": evals / f"M{index}" / "metrics.json"},
                     params=evaluate_params(cfg), aux=aux)


def plan(cfg: Config) -> list[StageSpec]:
    """Every stage of the run, in the order an executor must run them."""
    run_dir = Path(cfg.pipeline.run_dir)
    stages = _seed_stages(cfg, run_dir)
    for t in range(1, cfg.pipeline.iterations + 1):
        stages += _iteration_stages(cfg, run_dir, t)
    stages.append(StageSpec("report", 0, {}, {"report": run_dir / "report" / "report.md"}))
    return stages


def find_stage(stages: list[StageSpec], name: str, iteration: int) -> StageSpec:
    for spec in stages:
        if spec.name == name and spec.iteration == iteration:
            return spec
    known = sorted({f"{s.name} --iteration {s.iteration}" for s in stages})
    raise ConfigError(f"no stage {name!r} at iteration {iteration} in this config's plan; "
                      f"the plan has: {', '.join(known)}")
