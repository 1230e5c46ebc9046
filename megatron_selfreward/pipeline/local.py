"""The local executor: run a plan's stages in order on this machine, in this process.

Every stage runs by name from its `StageSpec` (each name of `pipeline/registry.py` has a small
adapter here, registered with `@adapter`, that hands the stage function the spec's paths and,
where the stage writes its own manifest, `spec_fingerprint(spec)`), so the same spec can be
handed to another executor, or to `selfreward stage <name> --iteration t`. Before running a
stage the executor compares the manifest next to its main output with the spec's fingerprint: a
match means done, and the stage is skipped. After it the manifest is written last (stages that
manage their own manifest, such as the sharded sample/judge stages, write it themselves).

Models are loaded once per stage group: `StageContext.models` (a `ModelCache`) keeps the last
policy, so sampling and judging with M_t share one load (evaluation too), and training stages
drop it first to free memory. Stages open no process world: the executor does.
World size 1 runs everything inside one gloo process group; training stages reuse it. With
`executor.nproc_per_node > 1` the training stages and the sharded generation stages run as
`selfreward stage ...` under torchrun (generation split over data-parallel ranks, see
`pipeline/workers.py`).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_selfreward.config import Config, save_resolved
from megatron_selfreward.errors import StageError
from megatron_selfreward.io import atomic_write_json
from megatron_selfreward.megatron.parallel import read_dist_env
from megatron_selfreward.pipeline.registry import STAGE_KINDS, adapter, adapter_for, stage_cost
from megatron_selfreward.pipeline.schedule import StageSpec, model_dir, spec_fingerprint
from megatron_selfreward.precision import describe
from megatron_selfreward.stages.manifest import is_done, manifest_path, write_manifest
from megatron_selfreward.threads import threads_choice

Log = Callable[[str], None]
# What `run_stage` hands each adapter: the spec's fingerprint taken before the stage ran, once
# (hashing inputs of hundreds of MB is not repeated per caller), or None when an input was missing.
Fingerprint = dict[str, Any] | None


class ModelCache:
    """At most one loaded policy (memory for two big models is not assumed): getting another
    model's frees the first. Loads lazily, in the process world the executor opened, so a stage
    whose results are all on disk builds no model."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.directory: Path | None = None
        self.policy: Any = None  # the loaded one, or None

    def get(self, directory: Path) -> Any:
        from megatron_selfreward.policy import load_policy

        if self.policy is None or self.directory != directory:
            self.release()
            self.policy, self.directory = load_policy(self.cfg, directory), directory
        return self.policy

    def release(self) -> None:
        if self.policy is not None:
            close = getattr(self.policy, "close", None)
            if close is not None:
                close()  # an engine's GPU memory and worker processes go before training starts
        self.policy = self.directory = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class StageContext:
    """What stages share within one executor run: the run directory and a one-model cache."""

    def __init__(self, cfg: Config, log: Log, array: bool = False, gather_only: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.pipeline.run_dir)
        self.log = log
        # Sharded stages under Slurm: one task of a job array, or the job that gathers after it.
        self.array, self.gather_only = array, gather_only
        self.models = ModelCache(cfg)


# ---------------------------------------------------------------------------------------------
# Adapters: StageSpec -> stage function. Each returns manifest counts, or None when the stage
# function (sharded sampling/judging, import, evaluate, report) wrote its own manifest.


@adapter("prepare_seed")
def _prepare_seed(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> dict[str, Any]:
    from megatron_selfreward.stages.seed import run_prepare_seed

    return run_prepare_seed(cfg, spec.outputs, ctx.log)


@adapter("import_model")
def _import_model(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    from megatron_selfreward.stages.import_model import run_import_model

    run_import_model(cfg, spec.aux.get("source"), spec.output, _fingerprint(spec, fp))


@adapter("build_eft")
def _build_eft(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> dict[str, Any]:
    from megatron_selfreward.stages.seed import run_build_eft

    return run_build_eft(cfg, spec.inputs["ranked_train"], ctx.models.get(spec.inputs["model"]), spec.output)


def _world_size() -> int:
    """Processes of the launcher that started this one (torchrun, srun, mpirun); 1 when plain."""
    return read_dist_env().world_size


def _torchrun(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    """Run a stage as `selfreward stage` under torchrun; it writes its own manifest."""
    from megatron_selfreward.stages.finetune import prepare_out_dir

    if spec.distributed:
        prepare_out_dir(spec.output, _fingerprint(spec, fp))  # here, once, not racing in each rank
    n = cfg.executor.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "megatron_selfreward.cli", "stage", spec.name, "--iteration", str(spec.iteration),
           "--config", str(ctx.run_dir / "config.yaml")]
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise StageError(f"{spec.label}: torchrun with {n} processes exited {code} (its output is above)")


def _launched(cfg: Config) -> bool:
    """True in the parent of a multi-process training stage: the stage runs in torchrun instead."""
    return cfg.executor.nproc_per_node > 1 and _world_size() == 1


@adapter("train_sft_baseline", "train_sft")
def _train_sft(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> dict[str, Any] | None:
    from megatron_selfreward.stages.finetune import run_train_sft

    ctx.models.release()
    if _launched(cfg):
        return _torchrun(cfg, spec, ctx, fp)
    data = {k: v for k, v in spec.inputs.items() if k != "init"}
    fp = _fingerprint(spec, fp) if _world_size() == 1 else None
    return run_train_sft(cfg, data, spec.inputs["init"], spec.output, fp)


@adapter("generate_prompts")
def _generate_prompts(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> dict[str, Any]:
    from megatron_selfreward.stages.prompts import run_generate_prompts

    earlier = [p for k, p in spec.inputs.items() if k.startswith("prompts_iter")]
    self_instruct = cfg.generation.prompts.source == "self_instruct"
    policy = ctx.models.get(spec.inputs["generator"]) if self_instruct else None
    return run_generate_prompts(cfg, spec.iteration, spec.inputs["ift"], earlier, policy, spec.output)


def _sharded(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint,
             run: Callable[..., Any]) -> None:
    """A generation stage split over this launcher's workers; the model loads on first use."""
    from megatron_selfreward.pipeline.workers import LazyEngine, generation_workers
    from megatron_selfreward.policy import load_tokenizer
    from megatron_selfreward.stages.shards import GATHER_ONLY, SINGLE

    if _launched(cfg) and not (ctx.array or ctx.gather_only):
        return _torchrun(cfg, spec, ctx, fp)
    model = spec.inputs["model"]
    tokenizer = load_tokenizer(cfg, model)
    with generation_workers(cfg, ctx.array, ctx.gather_only) as workers:
        if workers.size > 1:
            ctx.log(f"      {spec.name}: worker {workers.rank} of {workers.size} ({workers.name})")
        load = lambda: ctx.models.get(model).engine  # noqa: E731
        run(load() if workers.collective_load else LazyEngine(load), tokenizer, workers)
        if workers is not SINGLE and workers is not GATHER_ONLY:
            ctx.models.release()  # the model belongs to this stage's world, which ends here
    return None


@adapter("sample_responses")
def _sample_responses(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    from megatron_selfreward.stages.respond import run_sample_responses

    def run(engine: Any, tokenizer: Any, workers: Any) -> None:
        run_sample_responses(cfg, engine, tokenizer, spec.inputs["prompts"], _fingerprint(spec, fp),
                             spec.output, workers)

    _sharded(cfg, spec, ctx, fp, run)


@adapter("judge_responses")
def _judge_responses(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    from megatron_selfreward.stages.respond import run_judge_responses

    def run(engine: Any, tokenizer: Any, workers: Any) -> None:
        run_judge_responses(cfg, engine, tokenizer, spec.inputs["prompts"], spec.inputs["responses"],
                            _fingerprint(spec, fp), spec.output, workers)

    _sharded(cfg, spec, ctx, fp, run)


@adapter("build_pairs")
def _build_pairs(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    from megatron_selfreward.stages.respond import run_build_pairs

    i = spec.inputs
    run_build_pairs(i["prompts"], i["responses"], i["judgements"], spec.output, _fingerprint(spec, fp))


@adapter("train_dpo")
def _train_dpo(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> dict[str, Any] | None:
    from megatron_selfreward.stages.finetune import run_train_dpo

    ctx.models.release()
    if _launched(cfg):
        return _torchrun(cfg, spec, ctx, fp)
    fp = _fingerprint(spec, fp) if _world_size() == 1 else None
    return run_train_dpo(cfg, spec.iteration, spec.inputs["pairs"], spec.inputs["init"], spec.output, fp)


def evaluation_of(cfg: Config, spec: StageSpec) -> tuple[Any, dict[str, Any]]:
    """The `evaluate` spec as the stage takes it (an `Evaluation`, its held-out inputs derived
    where the spec's `aux` says when the run has none) and the fingerprint of those inputs."""
    from megatron_selfreward.stages.evaluate import Evaluation, derive_inputs

    i, aux = spec.inputs, spec.aux
    ev = derive_inputs(cfg, Evaluation(
        iteration=spec.iteration, model=i["model"], prev_model=i.get("prev_model"), eft_eval=i["eft_eval"],
        eval_prompts=i["eval_prompts"], metrics=spec.output, answers_dir=aux["answers"],
        derived_eft_eval=aux["derived_eft_eval"], derived_eval_prompts=aux["derived_eval_prompts"],
        run_dir=aux["run_dir"], answer_params=spec.params["answers"]))
    inputs = {**i, "eft_eval": ev.eft_eval, "eval_prompts": ev.eval_prompts}
    return ev, spec_fingerprint(replace(spec, inputs=inputs))


@adapter("evaluate")
def _evaluate(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    from megatron_selfreward.stages.evaluate import run_evaluate

    ev, fp = evaluation_of(cfg, spec)
    ctx.models.release()
    try:
        run_evaluate(cfg, ev, fp, ctx.models)
    finally:
        ctx.models.release()  # the next stage (or its torchrun children) starts with free memory


@adapter("report")
def _report(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    from megatron_selfreward.report import write_report

    write_report(cfg, ctx.run_dir)


# ---------------------------------------------------------------------------------------------
# Running


def _inputs_missing(spec: StageSpec) -> bool:
    return any(not path.exists() for path in spec.inputs.values())


def stage_done(spec: StageSpec) -> bool:
    return _done(spec, _current_fingerprint(spec))


def _current_fingerprint(spec: StageSpec) -> Fingerprint:
    """Of the inputs as they are now; None when one is missing (the stage's to report, so only a
    stage that made do without it is fingerprinted afterwards)."""
    return None if _inputs_missing(spec) else spec_fingerprint(spec)


def _done(spec: StageSpec, fp: Fingerprint) -> bool:
    # A stage whose inputs are not all there has nothing to compare its manifest with; running
    # it lets the stage say what is missing (the seed loader: what a seed directory must hold).
    if not STAGE_KINDS[spec.name].skip_when_done or fp is None:
        return False
    return is_done(spec.output, fp) and all(p.exists() for p in spec.outputs.values())


def _fingerprint(spec: StageSpec, fp: Fingerprint) -> dict[str, Any]:
    """The fingerprint taken of the inputs before the stage ran, or (an input was missing then)
    one of the inputs as they are now."""
    return fp if fp is not None else spec_fingerprint(spec)


def run_stage(cfg: Config, spec: StageSpec, ctx: StageContext) -> bool:
    """Run one stage unless done; True when it ran."""
    fp = _current_fingerprint(spec)
    if _done(spec, fp):
        return False
    _run_stage(cfg, spec, ctx, fp)
    return True


def _run_stage(cfg: Config, spec: StageSpec, ctx: StageContext, fp: Fingerprint) -> None:
    """Run one stage that is not done and publish its manifest; `fp`: its inputs' fingerprint,
    taken once before the stage reads them (`_current_fingerprint`)."""
    from megatron_selfreward.perf.memory import PeakMemory

    started = time.time()
    with PeakMemory(interval_s=0.2) as meter:
        counts = adapter_for(spec.name)(cfg, spec, ctx, fp)
    # None: the stage wrote its own manifest (or a launched sub-process did). Rank 0 writes.
    env = read_dist_env()
    if env.rank != 0:
        return
    facts = {"memory": meter.result(), "precision": precision_record(cfg),
             "threads": {"intra_op": torch.get_num_threads(), "why": threads_choice()}}
    if counts is not None:
        write_manifest(spec.output, spec.name, _fingerprint(spec, fp), counts, started,
                       {"iteration": spec.iteration, "processes": env.world_size, "launcher": env.launcher,
                        **facts})
    else:
        _add_facts(spec, facts)


def precision_record(cfg: Config) -> dict[str, str]:
    """The weight dtype a stage ran with and, when `auto` chose it, why."""
    prec = cfg.precision
    return {"params_dtype": prec.params_dtype, "choice": prec.dtype_choice or "set in the config"}


def _add_facts(spec: StageSpec, facts: dict[str, Any]) -> None:
    """A stage that wrote its own manifest: add this process's peak memory during the stage and
    the precision it ran with (a manifest that has them already keeps its own)."""
    path = manifest_path(spec.output)
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return  # nothing written (e.g. a worker that did not gather)
    missing = {k: v for k, v in facts.items() if k not in manifest}
    if missing:
        atomic_write_json(path, {**manifest, **missing})


def _eta(spent_s: float, cost_done: float, cost_left: float) -> str:
    if cost_done <= 0 or cost_left <= 0:
        return ""
    seconds = int(spent_s / cost_done * cost_left)
    return f", ETA ~{seconds // 60}m{seconds % 60:02d}s"


def run_local(cfg: Config, stages: list[StageSpec], log: Log = print) -> dict[str, Any]:
    """Run every stage of `stages` in order; returns {stages_run, stages_done, wall_time_s}."""
    from megatron_selfreward.megatron.parallel import single_process_world

    run_dir = Path(cfg.pipeline.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir)
    log(f"precision: {describe(cfg)}")
    started = time.time()
    ran, skipped = [], []
    spent, cost_done = 0.0, 0.0
    cost_left = sum(stage_cost(s.name) for s in stages)
    with single_process_world(cfg.pipeline.seed):
        ctx = StageContext(cfg, log)
        for i, spec in enumerate(stages, start=1):
            head = f"[{i}/{len(stages)}] {spec.label}"
            cost = stage_cost(spec.name)
            cost_left -= cost
            fp = _current_fingerprint(spec)
            if _done(spec, fp):
                skipped.append(spec.label)
                log(f"{head} (done)")
                continue
            log(f"{head} -> {spec.output}")
            t0 = time.time()
            _run_stage(cfg, spec, ctx, fp)
            took = time.time() - t0
            spent, cost_done = spent + took, cost_done + cost
            ran.append(spec.label)
            log(f"      {spec.name} finished in {took:.1f} s{_eta(spent, cost_done, cost_left)}")
        ctx.models.release()
    return {"run_dir": str(run_dir), "stages_run": ran, "stages_done": skipped,
            "wall_time_s": round(time.time() - started, 1), "last_model": str(_last_model(cfg))}


def _last_model(cfg: Config) -> Path:
    return model_dir(Path(cfg.pipeline.run_dir), cfg.pipeline.iterations + 1)
