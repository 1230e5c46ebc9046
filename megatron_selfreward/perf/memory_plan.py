"""Per-GPU memory estimates for a config under a TP/PP/DP layout, and which layouts fit.

Answers "will Llama 2 70B train on N nodes of 80 GB GPUs, and how should it be split?" before a
job is queued. All figures are bytes on one GPU of the worst pipeline stage.

Model state (Megatron mixed precision, as megatron/training.py sets it up: grads reduced in fp32):
  16-bit params: weights 2 B, fp32 grad buffer 4 B, fp32 main params + Adam m + v 12 B
  fp32 params:   weights 4 B, grads 4 B, Adam m + v 8 B
  The distributed optimizer shards the optimizer bytes (only) over DP: 6 + 12/DP B per param
  for bf16, as in Megatron-LM's distributed-optimizer table.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4, adapted to GQA, SwiGLU and RMSNorm without biases). Per layer, per sequence
of s tokens, 16-bit activations, 1-byte dropout masks, in units of s*h bytes:
  replicated unless SP (divide by TP with SP):  4 (two norm inputs) + 4 (QKV and FC1 GEMM
      inputs) + 2 (two hidden-dropout masks, when dropout > 0)                      = R
  split by TP:  2 (Q) + 4 g/a (K, V) + 2 (attention context = out-proj input)
      + 4 f/h (FC1 gate and up outputs) + 2 f/h (FC2 input)             = S = 4 + 4g/a + 6f/h
  attention matrix, only without a fused/flash kernel (split by TP): 5 a s / h (softmax
      output 2, dropout mask 1, dropout output 2; 2 a s / h without attention dropout)
  For GPT with MHA and f = 4h this is the paper's 34 + 5as/h. Llama 2 70B (g/a = 1/8,
  f/h = 3.5, flash): 35.5 s*h bytes per layer before TP.
  Full recomputation keeps only each layer's input (2 s*h, split by TP with SP) plus one
  layer's activations while it is recomputed.
  Pipeline (1F1B): stage i holds min(PP - i, micro-batches) micro-batches in flight; stage 0
  also keeps the embedding-dropout mask, the last stage the fp32 logits (4 s V / TP) that
  vocab_parallel_cross_entropy saves.

KV cache for generation: batch x seq x layers/PP x 2 x ceil(kv_heads/TP) x head_dim x bytes.
Not counted: CUDA context, NCCL buffers, workspaces, fragmentation - the `headroom` fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_selfreward.config import Config

GIB = 1024**3
Phase = Literal["sft", "dpo"]


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool

    @classmethod
    def from_config(cls, cfg: Config, dp: int) -> Layout:
        p = cfg.parallel
        return cls(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, dp,
                   p.sequence_parallel and p.tensor_model_parallel_size > 1,
                   p.use_distributed_optimizer)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU of the worst stage (`stage`) for training; generation is separate."""

    layout: Layout
    stage: int
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    activations_recompute: int
    train_total: int              # no recomputation, worst stage
    train_total_recompute: int    # full recomputation, worst stage
    generation_weights: int
    kv_cache: int

    @property
    def generation_total(self) -> int:
        return self.generation_weights + self.kv_cache


def _padded_vocab(cfg: Config, tp: int) -> int:
    # The output layer is split by rows over TP, so megatron pads the vocabulary to a multiple.
    return -(-cfg.model.vocab_size // tp) * tp


def stage_parameters(cfg: Config, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one GPU of pipeline stage `stage` (TP-split GEMMs, replicated norms)."""
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    attn = 2 * m.hidden_size**2 + 2 * m.hidden_size * m.num_query_groups * head_dim
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    layer = (attn + mlp) // tp + 2 * m.hidden_size
    total = m.num_layers // pp * layer
    vocab_rows = _padded_vocab(cfg, tp) // tp * m.hidden_size
    if stage == 0:
        total += vocab_rows
    if stage == pp - 1:
        total += m.hidden_size  # final norm
        if not (m.tie_embeddings and pp == 1):  # tied on one stage: the embedding is the output
            total += vocab_rows
    return total


def model_state_bytes_per_param(cfg: Config, layout: Layout) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter on one GPU."""
    half = cfg.precision.params_dtype != "float32"
    weights, grads = (2, 4) if half else (4, 4)
    optimizer = 12 if half else 8  # (fp32 main params +) Adam m and v
    if layout.distributed_optimizer:
        return weights, grads, optimizer / layout.dp
    return weights, grads, optimizer


def _dropout_masks(cfg: Config) -> int:
    return 2 if cfg.model.hidden_dropout > 0 else 0


def layer_activation_bytes(cfg: Config, layout: Layout, seq_len: int, sequences: int,
                           *, flash_attention: bool = True) -> float:
    """Stored activations of one transformer layer for one micro-batch (formula: module doc)."""
    m = cfg.model
    sbh = seq_len * sequences * m.hidden_size
    replicated = 4 + 4 + _dropout_masks(cfg)
    split = 4 + 4 * m.num_query_groups / m.num_attention_heads + 6 * m.ffn_hidden_size / m.hidden_size
    sp = layout.tp if layout.sequence_parallel else 1
    per_layer = sbh * (replicated / sp + split / layout.tp)
    if not flash_attention:
        matrix = 5 if m.attention_dropout > 0 else 2
        per_layer += matrix * m.num_attention_heads * seq_len**2 * sequences / layout.tp
    return per_layer


def _phase_batch(cfg: Config, phase: Phase) -> tuple[int, int, int]:
    """(seq_len, sequences per micro-batch, micro-batches per step per DP rank)."""
    opt = cfg.dpo if phase == "dpo" else cfg.sft
    # A DPO micro-batch of k pairs is 2k sequences: chosen and rejected go through together.
    sequences = opt.micro_batch_size * (2 if phase == "dpo" else 1)
    return opt.seq_len, sequences, opt.global_batch_size // opt.micro_batch_size


def stage_activation_bytes(cfg: Config, layout: Layout, stage: int, *, phase: Phase = "dpo",
                           recompute: bool = False, flash_attention: bool = True) -> int:
    """Peak stored activations on pipeline stage `stage` under 1F1B."""
    m = cfg.model
    seq_len, sequences, microbatches = _phase_batch(cfg, phase)
    in_flight = min(layout.pp - stage, max(microbatches // layout.dp, 1))
    layers = m.num_layers // layout.pp
    sbh = seq_len * sequences * m.hidden_size
    sp = layout.tp if layout.sequence_parallel else 1
    full_layer = layer_activation_bytes(cfg, layout, seq_len, sequences,
                                        flash_attention=flash_attention)
    if recompute:
        # Layer inputs stay; one layer's full set exists while it is recomputed for backward.
        total = in_flight * layers * 2 * sbh / sp + full_layer
    else:
        total = in_flight * layers * full_layer
    if stage == 0 and m.hidden_dropout > 0:
        total += in_flight * sbh / sp  # embedding dropout mask
    if stage == layout.pp - 1:
        # Final-norm input and output-layer input, then the fp32 logits the loss saves.
        total += 4 * sbh / sp + 4 * seq_len * sequences * _padded_vocab(cfg, layout.tp) / layout.tp
    return int(total)


def kv_cache_bytes(cfg: Config, layout: Layout, batch: int | None = None,
                   seq_len: int | None = None) -> int:
    """Generation KV cache per GPU (defaults: generation.batch_size, model.max_seq_len)."""
    m = cfg.model
    batch = cfg.generation.batch_size if batch is None else batch
    seq_len = m.max_seq_len if seq_len is None else seq_len
    head_dim = m.hidden_size // m.num_attention_heads
    kv_heads = math.ceil(m.num_query_groups / layout.tp)  # replicated when TP > KV heads
    dtype_bytes = 4 if cfg.precision.params_dtype == "float32" else 2
    return batch * seq_len * (m.num_layers // layout.pp) * 2 * kv_heads * head_dim * dtype_bytes


def estimate(cfg: Config, layout: Layout, *, phase: Phase = "dpo",
             flash_attention: bool = True) -> MemoryEstimate:
    """Training memory of the worst pipeline stage, and generation memory, for one layout."""
    w, g, o = model_state_bytes_per_param(cfg, layout)
    stages = sorted({0, layout.pp - 1})
    rows = []
    for stage in stages:
        params = stage_parameters(cfg, layout.tp, layout.pp, stage)
        state = (int(params * w), int(params * g), int(params * o))
        acts = [stage_activation_bytes(cfg, layout, stage, phase=phase, recompute=rc,
                                       flash_attention=flash_attention) for rc in (False, True)]
        rows.append((stage, params, state, acts))
    worst = max(rows, key=lambda r: sum(r[2]) + r[3][0])
    stage, params, (weights, grads, optimizer), (acts, acts_rc) = worst
    max_params = max(r[1] for r in rows)
    return MemoryEstimate(
        layout=layout, stage=stage, params=params, weights=weights, grads=grads,
        optimizer=optimizer, activations=acts, activations_recompute=acts_rc,
        train_total=max(sum(r[2]) + r[3][0] for r in rows),
        train_total_recompute=max(sum(r[2]) + r[3][1] for r in rows),
        generation_weights=int(max_params * w), kv_cache=kv_cache_bytes(cfg, layout))


def valid_layouts(cfg: Config, gpus_per_node: int, nodes: int, *, phase: Phase = "dpo") -> list[Layout]:
    """TP inside a node (NVLink), dividing heads, KV groups and FFN; PP dividing the layers; the
    global batch splitting evenly into micro-batches over DP."""
    m, p = cfg.model, cfg.parallel
    world = gpus_per_node * nodes
    opt = cfg.dpo if phase == "dpo" else cfg.sft
    layouts = []
    for tp in (t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0):
        if m.num_attention_heads % tp or m.num_query_groups % tp or m.ffn_hidden_size % tp:
            continue
        for pp in (q for q in range(1, world // tp + 1) if (world // tp) % q == 0):
            dp = world // (tp * pp)
            if m.num_layers % pp or opt.global_batch_size % (opt.micro_batch_size * dp):
                continue
            layouts.append(Layout(tp, pp, dp, p.sequence_parallel and tp > 1,
                                  p.use_distributed_optimizer))
    return layouts


@dataclass(frozen=True)
class Plan:
    estimate: MemoryEstimate
    fits_train: bool
    fits_train_recompute: bool
    fits_generation: bool

    @property
    def verdict(self) -> str:
        if self.fits_train:
            return "fits"
        return "fits with full recompute" if self.fits_train_recompute else "does not fit"


def plan_layouts(cfg: Config, gpus_per_node: int, nodes: int, gpu_mem_gib: float, *,
                 phase: Phase = "dpo", headroom: float = 0.10,
                 flash_attention: bool = True) -> list[Plan]:
    """Every valid layout with its estimate; fitting means <= (1 - headroom) x gpu_mem_gib."""
    budget = gpu_mem_gib * (1 - headroom) * GIB
    plans = []
    for layout in valid_layouts(cfg, gpus_per_node, nodes, phase=phase):
        est = estimate(cfg, layout, phase=phase, flash_attention=flash_attention)
        plans.append(Plan(est, est.train_total <= budget, est.train_total_recompute <= budget,
                          est.generation_total <= budget))
    return plans


def format_plan(cfg: Config, plans: list[Plan], gpu_mem_gib: float, headroom: float = 0.10,
                phase: Phase = "dpo") -> str:
    """A fixed-width table, GiB per GPU; the config's own layout is marked with '*'."""
    own = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    seq_len, sequences, _ = _phase_batch(cfg, phase)
    header = (f"{cfg.model.name}: {phase} training, {sequences} x {seq_len} tokens per "
              f"micro-batch; GiB per GPU (worst stage); budget {gpu_mem_gib * (1 - headroom):.1f} "
              f"of {gpu_mem_gib:g} GiB ({headroom:.0%} headroom)")
    cols = ("  TP PP  DP SP DO | weights  grads  optim   act act-rc |  train train-rc | "
            "gen(w+kv) | verdict")
    lines = [header, cols, "-" * len(cols)]
    for plan in plans:
        e, lay = plan.estimate, plan.estimate.layout
        gib = [x / GIB for x in (e.weights, e.grads, e.optimizer, e.activations,
                                 e.activations_recompute, e.train_total,
                                 e.train_total_recompute, e.generation_total)]
        mark = "*" if (lay.tp, lay.pp) == own else " "
        gen = f"{gib[7]:6.1f} {'ok' if plan.fits_generation else 'NO'}"
        lines.append(
            f"{mark}{lay.tp:3d}{lay.pp:3d}{lay.dp:4d} {'y' if lay.sequence_parallel else 'n':>2} "
            f"{'y' if lay.distributed_optimizer else 'n':>2} | {gib[0]:7.1f}{gib[1]:7.1f}"
            f"{gib[2]:7.1f}{gib[3]:6.1f}{gib[4]:7.1f} | {gib[5]:6.1f}{gib[6]:9.1f} | "
            f"{gen:>9} | {plan.verdict}")
    lines.append("act-rc/train-rc: full activation recomputation; gen: weights + KV cache "
                 f"(batch {cfg.generation.batch_size} x {cfg.model.max_seq_len} tokens); "
                 "DO: distributed optimizer")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# Generation: its own layout (config.generation_tp, PP = 1), replicas over the job's GPUs


@dataclass(frozen=True)
class GenerationPlan:
    tp: int
    replicas: int
    gpus_used: int
    gpus_total: int
    weights: int  # bytes per GPU
    kv_cache: int  # bytes per GPU
    fits: bool
    sample_prompts: int  # per replica
    judge_requests: int  # per replica (responses x judge samples)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def generation_plan(cfg: Config, gpus_per_node: int, gpu_mem_gib: float, *,
                    headroom: float = 0.10) -> GenerationPlan:
    """The generation layout of a sampling/judging job (a Slurm job array of
    `executor.slurm.array_tasks` tasks of `array_nodes` nodes each): TP per replica, replicas,
    weights + KV cache per GPU, prompts per replica. With TensorRT-LLM one array task is one
    replica (its LLM spans TP GPUs); with the Megatron engine every GPU of a task runs a rank,
    TP ranks per replica."""
    from megatron_selfreward.config import generation_tp

    slurm = cfg.executor.slurm
    tp = generation_tp(cfg)
    gpus_total = slurm.array_tasks * slurm.array_nodes * gpus_per_node
    if cfg.generation.engine == "trtllm":
        replicas = slurm.array_tasks if slurm.array_nodes * gpus_per_node >= tp else 0
    else:
        replicas = gpus_total // tp
    layout = Layout(tp, 1, max(replicas, 1), False, False)
    w, _, _ = model_state_bytes_per_param(cfg, layout)
    weights = int(stage_parameters(cfg, tp, 1, 0) * w)
    kv = kv_cache_bytes(cfg, layout)
    prompts = cfg.generation.prompts.num_prompts
    responses = prompts * cfg.generation.responses_per_prompt
    per = max(replicas, 1)
    return GenerationPlan(
        tp=tp, replicas=replicas, gpus_used=replicas * tp, gpus_total=gpus_total, weights=weights,
        kv_cache=kv, fits=weights + kv <= gpu_mem_gib * (1 - headroom) * GIB,
        sample_prompts=-(-prompts // per),
        judge_requests=-(-responses * cfg.judge.samples_per_response // per))


def format_generation_plan(cfg: Config, plan: GenerationPlan) -> str:
    slurm = cfg.executor.slurm
    engine = cfg.generation.engine
    lines = [
        f"generation (sample_responses, judge_responses): engine {engine}, TP {plan.tp} x PP 1 "
        f"per replica (generation.tensor_parallel_size; training: TP "
        f"{cfg.parallel.tensor_model_parallel_size} x PP {cfg.parallel.pipeline_model_parallel_size})",
        f"  job array: {slurm.array_tasks} task(s) x {slurm.array_nodes} node(s) = "
        f"{plan.gpus_total} GPUs -> {plan.replicas} replica(s) on {plan.gpus_used} GPUs",
        f"  per GPU: weights {plan.weights / GIB:.1f} GiB + KV cache {plan.kv_cache / GIB:.1f} GiB "
        f"(batch {cfg.generation.batch_size} x {cfg.model.max_seq_len} tokens) = "
        f"{plan.total / GIB:.1f} GiB: {'fits' if plan.fits else 'does NOT fit'}",
        f"  per replica: {plan.sample_prompts} prompts to sample "
        f"(x{cfg.generation.responses_per_prompt} responses), {plan.judge_requests} judge samples",
    ]
    if plan.replicas == 0:
        per_task = plan.gpus_total // max(slurm.array_tasks, 1)
        lines.append(f"  NO replica fits a task: TP {plan.tp} needs {plan.tp} GPUs, a task has "
                     f"{per_task} (raise executor.slurm.array_nodes or lower "
                     "generation.tensor_parallel_size)")
    elif plan.gpus_used < plan.gpus_total:
        lines.append(f"  {plan.gpus_total - plan.gpus_used} GPU(s) idle: TensorRT-LLM runs one replica "
                     "per array task (more, smaller tasks use them)")
    return "\n".join(lines)
