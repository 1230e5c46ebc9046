"""The in-process generation engine: batched KV-cache decoding on a Megatron-Core GPTModel.

Used for response sampling, judging and prompt generation on the everyday CPU path (and as the
fallback on GPUs without TensorRT-LLM). It runs this rank's shard of the model (so tensor
parallelism is Megatron's own weight layout) with its own attention over its own KV cache:

- The forward passes are MegatronRunner's (runner.py). Plain Llama layers (the local spec) run
  on their weight tensors directly (GEMMs, RMSNorm, attention, an all-reduce after row-parallel
  GEMMs): Megatron's per-call wrappers cost about as much as the GEMMs at decode batch sizes on
  a CPU. Other layers (the TE spec on GPUs) run through their Megatron modules.
  `dtype="bfloat16"` runs an fp32 model as a bf16 copy (AMX CPUs). On CPUs the direct path's
  decode GEMMs take oneDNN-packed weights with the residual add and SwiGLU fused in
  (packed_linear.py), a decode step's attention and RMSNorms are C++ kernels
  (kernels/decode_cpu.cpp; `generation.cpu_kernels`), and its ops bypass torch-function modes
  (the CPU compat redirect costs microseconds per op). TP > 1 keeps the packed GEMMs; the
  residual add then follows the all-reduce instead of being fused.
- Why not megatron's StaticInferenceContext: it stores keys *before* RoPE and re-rotates the
  whole cache every step, takes RoPE positions from the column index (one offset for the whole
  batch, so left padding shifts a row's positions and a shared prefix cannot be followed by
  padded suffixes) and repeats KV heads for GQA each step. Our cache stores rotated keys, takes
  per-row position ids, and calls torch's SDPA with native GQA. Measured side by side in
  benchmarks/generate_cpu.py (`kv_cache` section; SmolLM2, fp32 greedy, 16 rows, 1 thread on a
  loaded machine: 52.6 vs 38.7 decode tokens/s, identical greedy tokens; see results/).
- Layout of one micro-batch's cache: columns [0, P) hold the shared prefix, columns [P, P + S)
  the prompt suffixes right-aligned (a row's padding sits just after the prefix and is masked),
  then one column per decode step. Every row's last prompt token is in the same column, so one
  step feeds one token per row. Position ids are per row and count real tokens only.
- Reuse granularity: (1) identical prompts (the `n` samples of a request, and equal prompts
  across requests) are prefilled once and their cache rows copied; (2) the longest common token
  prefix of all distinct prompts in a micro-batch (the judge rubric, a few-shot header, the chat
  template's system turn) is prefilled once with batch size 1 and copied into every row.
  Requests are sorted by prompt tokens before they are cut into micro-batches, so prompts that
  share a prefix land together. Nothing is cached across `generate` calls. On CPUs a shared
  prefix of SHARED_PREFIX_ATTENTION_MIN_TOKENS or more (the judge rubric) is not copied at all:
  it stays in its one-row cache and attention is split at it (every row's queries against the
  prefix in one call, each row against its own columns, merged by log-sum-exp).
- Continuous batching (generation.continuous_batching, the default): as rows finish, waiting
  rows join the running batch in their slots. A joining request's prompt but its last token is
  prefilled apart (once for its n samples, the attached shared prefix reused) into a small cache
  and copied into the freed rows right-aligned to end just before the current column; the last
  prompt token then rides in the next decode step with every other row's token. A row joins only
  when its prompt fits before the current column and, with an attached shared prefix, starts
  with that prefix (else it waits for a new micro-batch). Joins wait for JOIN_FRACTION of the
  batch to be free (one prefill for several requests) unless fewer rows can join at all. When
  the cache runs out of columns or rows it is laid out anew: kept rows only, leading columns no
  row uses dropped, room for the longest sample added. A row's draws are indexed by its own step,
  so joining changes no row's tokens. Without it (or with nothing waiting) finished rows are
  dropped from the batch (and the cache) once a quarter of them are done.
- Rows per micro-batch: generation.batch_size, or 0 = auto: as many rows as fit
  KV_CACHE_MEMORY_FRACTION of the available memory (KV bytes per row from the longest prompt and
  sample), capped at the decode sweet spot of the device (DECODE_ROWS_CPU / DECODE_ROWS_GPU;
  a TP group takes its smallest).
- Sampling: temperature, then top-k, then top-p over the renormalised top-k distribution, by
  inverse CDF with one uniform per token drawn from the sample's own generator, so a sample
  depends only on its seed and sample index, not on the batch. Padded vocabulary rows (vocab
  padded for TP) are cut off before anything sees them.
- TP > 1: logits are all-gathered over the TP group, every rank samples, and TP rank 0's tokens
  and log-probs are broadcast so all ranks continue identically. Every TP rank must call
  `generate` with the same requests. PP > 1 and sequence parallelism are refused with a clear
  error (generate from a PP=1 copy: checkpoints reshard on load).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from megatron_selfreward.config import Config
from megatron_selfreward.generation.engine import (
    FinishReason,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    Sample,
    SamplingParams,
    engine_rates,
    sample_seed,
)
from megatron_selfreward.generation.runner import KVCache, MegatronRunner
from megatron_selfreward.generation.sampling import sample_tokens

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dropping finished rows copies the running cache; do it once this share of the batch is done.
# On a CPU every row costs its share of the decode GEMMs (compute-bound), so a dead row wastes a
# row's work each step: dropping them as soon as two are done gave 208-216 -> 238 tok/s on the
# vLLM comparison workload (64 rows, most samples near 128 tokens; 1/16: 227-248). On a GPU the
# decode step reads the weights whatever the rows, extra rows are nearly free, and the copy is
# what costs: there the cache is relaid out only once a quarter of the rows are done.
COMPACT_FRACTION_CPU = 1 / 32
COMPACT_FRACTION_GPU = 0.25
# Decoding a short window of tail tokens is enough to see a stop string appear.
STOP_WINDOW_EXTRA_TOKENS = 8
# A shared prefix at least this long stays in one cache row and is attended to once for all
# rows (CPU); shorter ones are copied into every row, where one attention call is cheaper.
SHARED_PREFIX_ATTENTION_MIN_TOKENS = 128
# Continuous batching: rows join once this share of the batch's rows is free (or all that can).
JOIN_FRACTION = 0.125
# generation.batch_size 0 (auto): the KV cache may take this share of the available memory, and
# a micro-batch has at most this many rows: on CPUs the decode step reads every weight once per
# step whatever the rows, and past about 64 rows the GEMMs stop getting cheaper per row
# (benchmarks/results/continuous_batching.md); GPUs keep gaining to a few hundred.
KV_CACHE_MEMORY_FRACTION = 0.25
DECODE_ROWS_CPU = 64
DECODE_ROWS_GPU = 256


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Row:
    """One sample being generated: a row of a micro-batch."""

    request_index: int
    sample_index: int
    prompt: tuple[int, ...]
    params: SamplingParams
    max_new_tokens: int
    seed: int
    # Cache columns the row may use: max_new_tokens, plus room for its Followup when it fits.
    capacity: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Followup state: where it starts in token_ids, how the own part ended, tokens still to feed.
    followup_at: int | None = None
    own_finish: FinishReason | None = None
    forced: list[int] = field(default_factory=list)

    @property
    def drawable(self) -> tuple[int, ...]:
        """The only tokens this row may draw now (empty: any): its request's allowed_token_ids,
        or its Followup's once the Followup's own tokens are fed."""
        if self.followup_at is None:
            return tuple(self.params.allowed_token_ids)
        assert self.params.followup is not None
        return self.params.followup.allowed_token_ids


@dataclass
class _Running:
    """A micro-batch being decoded: cache row k holds batch[live[k]], fed tokens[k] at
    positions[k] next, drawing with params' row k from its uniforms column (step - born[k])."""

    cache: KVCache
    params: tuple[torch.Tensor, ...]  # temperature, top_k, top_p, uniforms
    positions: torch.Tensor
    born: torch.Tensor  # the decode step of each row's first draw
    live: list[int]
    tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def keep(self, index: torch.Tensor) -> None:
        """Keep the per-row tensors of rows `index` only (the caller updates cache and live)."""
        self.params = tuple(t[index] for t in self.params)
        self.tokens, self.positions, self.born = self.tokens[index], self.positions[index], self.born[index]


def _available_memory_bytes() -> int:
    """Memory available to new allocations on this machine (MemAvailable), else all of it."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix of the prompts, leaving every prompt at least one token."""
    first = prompts[0]
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _right_aligned(prompts: Sequence[tuple[int, ...]], start: int, width: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions and validity [rows, width] of prompt[start:], padded on the left."""
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    positions = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        suffix = prompt[start:start + width]
        tokens[row, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        positions[row, width - len(suffix):] = torch.arange(start, start + len(suffix))
        valid[row, width - len(suffix):] = True
    return tokens.to(device), positions.to(device), valid.to(device)


_STAT_KEYS = (
    "requests", "samples", "micro_batches", "prefill_tokens_requested", "prefill_tokens_computed",
    "prefill_pad_tokens", "decode_tokens", "decode_row_steps", "decode_steps", "followups",
    "prefill_time_s", "decode_time_s", "rows_joined", "joins", "cache_relayouts",
)


class MegatronEngine(GenerationEngine):
    """Batched KV-cache generation on this process's Megatron-Core GPTModel (see module docs).

    model: the GPTModel (or its DDP wrapper) of this rank; cfg: the run config (vocab size,
    max_seq_len, generation.batch_size as the default rows per micro-batch, pipeline.seed);
    tokenizer: anything with `decode(list[int]) -> str`, needed for stop strings and to fill
    `Sample.text`; eos_token_ids: default = the tokenizer's `eos_token_id`; dtype: compute
    dtype of generation ("bfloat16" runs fp32-trained weights as a bf16 copy, several times
    faster on CPUs with AMX); default = the model's. cpu_kernels: "auto", "on" or "off"
    (default: generation.cpu_kernels). max_batch_size: rows per micro-batch, 0 = auto
    (default: generation.batch_size). continuous: rows join as others finish (default:
    generation.continuous_batching).
    """

    def __init__(self, model: Any, cfg: Config, tokenizer: Any = None,
                 eos_token_ids: Sequence[int] | None = None, *, max_batch_size: int | None = None,
                 prefix_reuse: bool = True, seed: int | None = None,
                 dtype: str | torch.dtype | None = None, cpu_kernels: str | None = None,
                 continuous: bool | None = None) -> None:
        self.cfg = cfg
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.cpu_kernels = cpu_kernels or cfg.generation.cpu_kernels
        self.runner = MegatronRunner(model, cfg.model.vocab_size, self.dtype, kernels=self.cpu_kernels)
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_batch_size = cfg.generation.batch_size if max_batch_size is None else max_batch_size
        self.continuous = cfg.generation.continuous_batching if continuous is None else continuous
        self.prefix_reuse = prefix_reuse
        self.seed = cfg.pipeline.seed if seed is None else seed
        self.max_seq_len = cfg.model.max_seq_len
        self._stats: dict[str, float] = {}
        self.reset_stats()

    # -- protocol --------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, float]:
        """Counters since `reset_stats`, plus derived rates.

        prefill_tokens_requested: prompt tokens over all samples (what prefilling every sample
        separately would compute); prefill_tokens_computed: real tokens actually run;
        prefill_pad_tokens: padding columns run besides; decode_tokens: tokens generated;
        decode_row_steps: rows run in decode steps (finished rows wait for compaction or a join);
        rows_joined: rows that joined a running batch (continuous batching), in `joins` prefills;
        cache_relayouts: running caches laid out anew to make room for joining rows.
        """
        return {**self._stats, **engine_rates(self._stats)}

    def reset_stats(self) -> None:
        self._stats = {key: 0.0 if key.endswith("_s") else 0 for key in _STAT_KEYS}

    def load_weights(self, source: Any) -> None:
        """New weights, once per iteration: a Megatron distributed checkpoint directory (any TP),
        or a GPTModel (the trained one, possibly re-wrapped). Refreshes cast weight copies."""
        if isinstance(source, (str, Path)):
            from megatron_selfreward.megatron.checkpoint import load_model

            load_model(self.runner.model, source)
            source = self.runner.model
        if not isinstance(source, torch.nn.Module):
            raise TypeError(f"load_weights takes a checkpoint directory or a GPTModel, not {type(source)}")
        self.runner = MegatronRunner(source, self.cfg.model.vocab_size, self.dtype,
                                     kernels=self.cpu_kernels)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        rows = self._rows(requests)
        self.runner.refresh()
        batch_size = self.max_batch_size or (self.auto_batch_size(rows) if rows else 1)
        with self._inference_mode():
            if self.continuous:
                waiting = list(rows)
                while waiting:
                    batch = next(self._micro_batches(waiting, batch_size))
                    del waiting[: len(batch)]
                    self._run_batch(batch, waiting, batch_size)
            else:
                for batch in self._micro_batches(rows, batch_size):
                    self._run_batch(batch)
        by_request: list[list[Sample]] = [[] for _ in requests]
        for row in sorted(rows, key=lambda r: (r.request_index, r.sample_index)):
            by_request[row.request_index].append(self._to_sample(row))
        self._stats["requests"] += len(requests)
        self._stats["samples"] += len(rows)
        return [GenerationResult(r.request_id, s) for r, s in zip(requests, by_request)]

    # -- planning ----------------------------------------------------------------------------

    def _rows(self, requests: Sequence[GenerationRequest]) -> list[_Row]:
        """One row per sample, validated, in prompt order (shared prefixes adjacent)."""
        rows: list[_Row] = []
        order = sorted(range(len(requests)), key=lambda i: requests[i].prompt_token_ids)
        for index in order:
            request = requests[index]
            prompt, params = tuple(request.prompt_token_ids), request.params
            if params.stop_strings and self.tokenizer is None:
                raise ValueError(f"request {request.request_id!r}: stop_strings need a tokenizer; "
                                 "pass tokenizer= to MegatronEngine")
            if len(prompt) >= self.max_seq_len:
                raise ValueError(f"request {request.request_id!r}: prompt has {len(prompt)} tokens, "
                                 f"model.max_seq_len is {self.max_seq_len}")
            if min(prompt) < 0 or max(prompt) >= self.runner.vocab_size:
                raise ValueError(f"request {request.request_id!r}: token id outside the vocabulary "
                                 f"[0, {self.runner.vocab_size})")
            if any(t >= self.runner.vocab_size for t in params.allowed_token_ids):
                raise ValueError(f"request {request.request_id!r}: allowed_token_ids outside the "
                                 f"vocabulary [0, {self.runner.vocab_size})")
            if params.followup is not None and params.followup.skip_if is not None and self.tokenizer is None:
                raise ValueError(f"request {request.request_id!r}: a Followup with skip_if needs a "
                                 "tokenizer; pass tokenizer= to MegatronEngine")
            # Generation stops at the model's context length ("length") rather than failing.
            room = self.max_seq_len - len(prompt)
            max_new = min(params.max_new_tokens, room)
            extra = len(params.followup.token_ids) + params.followup.max_new_tokens if params.followup else 0
            for j in range(params.n):
                seed = sample_seed(params.seed, j, engine_seed=self.seed, request_id=request.request_id)
                rows.append(_Row(index, j, prompt, params, max_new, seed, min(max_new + extra, room)))
        return rows

    def auto_batch_size(self, rows: Sequence[_Row]) -> int:
        """Rows per micro-batch for generation.batch_size 0: what fits KV_CACHE_MEMORY_FRACTION of
        the available memory, at most the device's decode sweet spot; the minimum over TP ranks
        (their join decisions must agree)."""
        conf = self.runner.model.config
        groups = max(1, conf.num_query_groups // self.runner.tp_size)
        head_dim = conf.kv_channels or conf.hidden_size // conf.num_attention_heads
        itemsize = torch.empty(0, dtype=self.runner.dtype).element_size()
        token_bytes = 2 * len(self.runner.layers) * groups * head_dim * itemsize
        # Continuous batching lays a cache out with room for one more longest sample.
        row_tokens = max(len(r.prompt) + r.capacity for r in rows) + max(r.capacity for r in rows)
        device = self.runner.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            sweet_spot = DECODE_ROWS_GPU
        else:
            free, sweet_spot = _available_memory_bytes(), DECODE_ROWS_CPU
        size = max(1, min(sweet_spot, int(KV_CACHE_MEMORY_FRACTION * free) // (row_tokens * token_bytes)))
        if self.runner.tp_size > 1:
            import torch.distributed as dist

            agreed = torch.tensor([size], dtype=torch.long, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.runner.tp_group)
            size = int(agreed.item())
        return size

    def _micro_batches(self, rows: list[_Row], max_batch_size: int) -> Iterator[list[_Row]]:
        """Up to max_batch_size rows each; a request's samples are split only if n exceeds it."""
        batch: list[_Row] = []
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and rows[j].request_index == rows[i].request_index:
                j += 1
            group = rows[i:j]
            if batch and len(batch) + len(group) > max_batch_size:
                yield batch
                batch = []
            while len(group) > max_batch_size:
                yield group[: max_batch_size]
                group = group[max_batch_size:]
            batch.extend(group)
            i = j
        if batch:
            yield batch

    @contextlib.contextmanager
    def _inference_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) and no sequence parallelism for the duration, restoring the
        trainer's settings afterwards."""
        model = self.runner.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), self.runner.sequence_parallel_off():
                yield
        finally:
            model.train(was_training)

    # -- one micro-batch ----------------------------------------------------------------------

    def _run_batch(self, batch: list[_Row], waiting: list[_Row] | None = None, batch_size: int = 0) -> None:
        """Prefill and decode one micro-batch; with `waiting` (continuous batching) rows of it
        join the batch (and leave `waiting`) as rows finish, up to batch_size rows at a time."""
        start = time.perf_counter()
        cache, logits = self._prefill(batch)
        prefilled = time.perf_counter()
        self._stats["prefill_time_s"] += prefilled - start
        before = self._stats["prefill_time_s"]
        self._decode(batch, cache, logits, waiting, batch_size)
        joining_s = self._stats["prefill_time_s"] - before  # the joining rows' prefills
        self._stats["decode_time_s"] += time.perf_counter() - prefilled - joining_s
        self._stats["micro_batches"] += 1

    def _prefill(self, batch: list[_Row]) -> tuple[KVCache, torch.Tensor]:
        """Prefill each distinct prompt once (shared prefix once), then one cache row per sample."""
        unique: dict[tuple[int, ...], int] = {}
        row_to_unique = [unique.setdefault(row.prompt, len(unique)) for row in batch]
        prompts = list(unique)
        shared = shared_prefix_len(prompts) if self.prefix_reuse and len(prompts) > 1 else 0
        width = max(len(p) for p in prompts) - shared
        max_len = shared + width + max(row.capacity for row in batch)
        layers = len(self.runner.layers)
        device = self.runner.device
        cache = KVCache(len(prompts), max_len, layers, device)
        if shared:
            prefix = KVCache(1, shared, layers, device)
            tokens, positions, valid = _right_aligned(prompts[:1], 0, shared, device)
            self.runner.prefill(tokens, positions, valid, prefix)
            if shared >= SHARED_PREFIX_ATTENTION_MIN_TOKENS and device.type == "cpu":
                cache.attach_prefix(prefix)
            else:
                cache.fill_prefix(prefix)
        tokens, positions, valid = _right_aligned(prompts, shared, width, device)
        logits = self.runner.prefill(tokens, positions, valid, cache)
        if row_to_unique != list(range(len(prompts))):
            index = torch.tensor(row_to_unique, dtype=torch.long, device=device)
            cache, logits = cache.take_rows(index), logits[index]
        computed = shared + sum(len(p) - shared for p in prompts)
        self._stats["prefill_tokens_requested"] += sum(len(row.prompt) for row in batch)
        self._stats["prefill_tokens_computed"] += computed
        self._stats["prefill_pad_tokens"] += len(prompts) * width - (computed - shared)
        return cache, logits

    def _decode(self, batch: list[_Row], cache: KVCache, logits: torch.Tensor,
                waiting: list[_Row] | None = None, batch_size: int = 0) -> None:
        """Sample, append, stop, let waiting rows join or drop finished rows, step the model;
        until every row is done."""
        device = self.runner.device
        # Uniform columns per row: every row's draws are indexed by its own step (step - born).
        width = max(row.capacity for row in (batch + waiting if waiting else batch))
        run = _Running(
            cache, self._row_tensors(batch, width),
            torch.tensor([len(row.prompt) for row in batch], dtype=torch.long, device=device),
            torch.zeros(len(batch), dtype=torch.long, device=device), list(range(len(batch))))
        prefix = batch[0].prompt[: cache.prefix_len]  # the attached shared prefix, if any
        compact_fraction = COMPACT_FRACTION_GPU if device.type == "cuda" else COMPACT_FRACTION_CPU
        step = 0
        while True:
            temperature, top_k, top_p, uniforms = run.params
            draws = uniforms.gather(1, (step - run.born).clamp_(max=width - 1)[:, None])[:, 0]
            mask = self._step_mask([batch[index] for index in run.live])
            with torch._C.DisableTorchFunction():  # plain torch ops (see MegatronRunner)
                tokens, logprobs = sample_tokens(logits, temperature, top_k, top_p, draws, mask)
            tokens, logprobs = self._sync_tensor_parallel(tokens, logprobs)
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()  # one device sync
            fed: dict[int, int] = {}  # cache row -> the token it is fed instead of the sampled one
            for k, index in enumerate(run.live):
                row = batch[index]
                if row.finish_reason is not None:
                    continue
                if row.forced:
                    fed[k] = self._append_forced(row, logits[k])
                else:
                    self._append(row, token_list[k], logprob_list[k])
                # A sample ended by EOS: the Followup's first token takes the EOS's place.
                if row.finish_reason is not None and self._start_followup(row) and row.own_finish == "eos":
                    fed[k] = self._append_forced(row, logits[k])
            if fed:
                index = torch.tensor(list(fed), dtype=torch.long, device=tokens.device)
                tokens = tokens.index_copy(0, index, torch.tensor(list(fed.values()), dtype=tokens.dtype,
                                                                  device=tokens.device))
            run.tokens = tokens
            if waiting:
                self._join(batch, run, waiting, batch_size, prefix, width, step)
            alive = [k for k, index in enumerate(run.live) if batch[index].finish_reason is None]
            if not alive:
                return
            if len(run.live) - len(alive) >= max(1.0, compact_fraction * len(run.live)):
                keep = torch.tensor(alive, dtype=torch.long, device=device)
                run.cache = run.cache.take_rows(keep)
                run.keep(keep)
                run.live = [run.live[k] for k in alive]
            step += 1
            ones = torch.ones(len(run.live), 1, dtype=torch.bool, device=device)
            logits = self.runner.forward(run.tokens[:, None], run.positions[:, None], ones, run.cache)
            run.positions = run.positions + 1
            self._stats["decode_steps"] += 1
            self._stats["decode_row_steps"] += len(run.live)

    def _join(self, batch: list[_Row], run: "_Running", waiting: list[_Row], batch_size: int,
              prefix: tuple[int, ...], width: int, step: int) -> None:
        """Move waiting rows into the running batch (continuous batching, see the module docs).

        Decisions depend only on finish states, prompts and the cache layout, which every TP
        rank has alike, so all ranks join the same rows at the same step.
        """
        free = [k for k, index in enumerate(run.live) if batch[index].finish_reason is not None]
        slots = len(free) + batch_size - len(run.live)
        if slots <= 0:
            return
        cache = run.cache
        column, p = cache.length, cache.prefix_len
        take: list[int] = []
        for i, row in enumerate(waiting):
            if len(take) == slots:
                break
            if len(row.prompt) - 1 <= column and (not p or (len(row.prompt) > p and row.prompt[:p] == prefix)):
                take.append(i)
        if not take or (len(take) < max(1, int(JOIN_FRACTION * batch_size)) and len(take) == slots):
            return  # wait for more free rows: one prefill for several joining requests
        rows = [waiting[i] for i in take]
        for i in reversed(take):
            del waiting[i]
        start = time.perf_counter()
        joined = self._prefill_join(rows, cache.prefix)
        device = self.runner.device
        new = (self._row_tensors(rows, width),
               torch.tensor([row.prompt[-1] for row in rows], dtype=run.tokens.dtype, device=device),
               torch.tensor([len(row.prompt) - 1 for row in rows], dtype=torch.long, device=device),
               torch.full((len(rows),), step + 1, dtype=torch.long, device=device))
        indices = list(range(len(batch), len(batch) + len(rows)))
        batch.extend(rows)
        if len(rows) <= len(free) and column + max(row.capacity for row in rows) <= cache.max_len:
            index = torch.tensor(free[: len(rows)], dtype=torch.long, device=device)
            for t, value in zip(run.params, new[0]):
                t[index] = value
            run.tokens[index], run.positions[index], run.born[index] = new[1:]
            for k, i in zip(free, indices):
                run.live[k] = i
        else:
            kept = [k for k in range(len(run.live)) if k not in set(free)]
            index = torch.tensor(kept, dtype=torch.long, device=device)
            # Drop leading columns no kept row uses, leaving room for the joining prompts.
            used = cache.valid[index, p:column].any(0).nonzero()
            first = int(used[0]) if len(used) else column - p
            widest = max(len(row.prompt) - 1 - p for row in rows)
            trim = max(0, min(first, column - p - widest))
            run.cache = cache.relayout(index, len(kept) + len(rows), trim, column - trim + 2 * width)
            run.keep(index)
            run.params = tuple(torch.cat([t, value]) for t, value in zip(run.params, new[0]))
            run.tokens, run.positions, run.born = (
                torch.cat([t, value]) for t, value in zip((run.tokens, run.positions, run.born), new[1:]))
            run.live = [run.live[k] for k in kept] + indices
            index = torch.arange(len(kept), len(kept) + len(rows), dtype=torch.long, device=device)
            self._stats["cache_relayouts"] += 1
        run.cache.put_rows(index, joined)
        self._stats["rows_joined"] += len(rows)
        self._stats["joins"] += 1
        self._stats["prefill_time_s"] += time.perf_counter() - start

    def _prefill_join(self, rows: list[_Row], prefix: KVCache | None) -> KVCache | None:
        """The joining rows' prompts but their last token (fed by the next decode step), each
        distinct one once, after the attached shared prefix: one cache row per joining row, or
        None when there is nothing to prefill."""
        p = 0 if prefix is None else prefix.length
        unique: dict[tuple[int, ...], int] = {}
        row_to_unique = [unique.setdefault(row.prompt[:-1], len(unique)) for row in rows]
        prompts = list(unique)
        width = max(len(q) for q in prompts) - p
        self._stats["prefill_tokens_requested"] += sum(len(row.prompt) for row in rows)
        # The last prompt token runs in the decode step, once per row.
        self._stats["prefill_tokens_computed"] += sum(len(q) - p for q in prompts) + len(rows)
        self._stats["prefill_pad_tokens"] += len(prompts) * width - sum(len(q) - p for q in prompts)
        if width == 0:
            return None
        device = self.runner.device
        cache = KVCache(len(prompts), p + width, len(self.runner.layers), device)
        if prefix is not None:
            cache.attach_prefix(prefix)
        tokens, positions, valid = _right_aligned(prompts, p, width, device)
        self.runner.prefill(tokens, positions, valid, cache)
        if row_to_unique != list(range(len(prompts))):
            cache = cache.take_rows(torch.tensor(row_to_unique, dtype=torch.long, device=device))
        return cache

    def _row_tensors(self, batch: list[_Row], steps: int) -> tuple[torch.Tensor, ...]:
        """Per-row temperature, top_k, top_p and the row's uniforms for each of `steps` steps."""
        uniforms = torch.zeros(len(batch), steps, dtype=torch.float64)
        for k, row in enumerate(batch):
            if not row.params.greedy:
                gen = torch.Generator().manual_seed(row.seed)
                uniforms[k, : row.max_new_tokens] = torch.rand(row.max_new_tokens, generator=gen,
                                                               dtype=torch.float64)
                # A followup's draws continue the same stream: the own part is unchanged by it.
                extra = row.capacity - row.max_new_tokens
                uniforms[k, row.max_new_tokens: row.capacity] = torch.rand(extra, generator=gen,
                                                                           dtype=torch.float64)
        temperature = torch.tensor([row.params.temperature for row in batch], dtype=torch.float32)
        top_k = torch.tensor([row.params.top_k for row in batch], dtype=torch.long)
        top_p = torch.tensor([row.params.top_p for row in batch], dtype=torch.float32)
        # Uniforms come from CPU generators: the same samples on any device.
        return tuple(t.to(self.runner.device) for t in (temperature, top_k, top_p, uniforms))

    def _sync_tensor_parallel(self, tokens: torch.Tensor, logprobs: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every TP rank continues with TP rank 0's tokens (bitwise-equal logits are not promised)."""
        if self.runner.tp_size == 1:
            return tokens, logprobs
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        packed = torch.stack([tokens.double(), logprobs.double()])
        dist.broadcast(packed, src=ps.get_tensor_model_parallel_src_rank(),
                       group=ps.get_tensor_model_parallel_group())
        return packed[0].long(), packed[1].float()

    # -- stopping and text --------------------------------------------------------------------

    def _step_mask(self, rows: list[_Row]) -> torch.Tensor | None:
        """This step's [rows, vocab] bool mask of the tokens each row may draw (`_Row.drawable`);
        None when no row is limited, the usual case."""
        limited = [(k, row.drawable) for k, row in enumerate(rows) if row.drawable]
        if not limited:
            return None
        mask = torch.ones(len(rows), self.runner.vocab_size, dtype=torch.bool)
        for k, ids in limited:
            mask[k] = False
            mask[k, list(ids)] = True
        return mask.to(self.runner.device)

    def _append_forced(self, row: _Row, logits: torch.Tensor) -> int:
        """Append the next of the row's Followup tokens (fed, not drawn) with its log-prob under
        this step's raw logits; returns it, the token the row is fed next."""
        token = row.forced.pop(0)
        self._append(row, token, float(logits[token] - torch.logsumexp(logits, dim=-1)))
        return token

    def _start_followup(self, row: _Row) -> bool:
        """At the end of a row's own part: begin its Followup if it has one that applies and fits."""
        f = row.params.followup
        if f is None or row.followup_at is not None or row.finish_reason not in ("eos", "length"):
            return False
        own = row.token_ids[:-1] if row.finish_reason == "eos" else row.token_ids
        if len(own) + len(f.token_ids) + f.max_new_tokens > row.capacity:
            return False  # no room left in the context: the sample stays as it is
        if f.skip_if is not None and f.skip_if(self.decode_text(row.token_ids, row.finish_reason, row.params)):
            return False
        row.own_finish, row.finish_reason = row.finish_reason, None
        if row.own_finish == "eos":
            row.token_ids.pop()
            row.logprobs.pop()
        row.followup_at, row.forced = len(row.token_ids), list(f.token_ids)
        self._stats["followups"] += 1
        return True

    def _append(self, row: _Row, token: int, logprob: float) -> None:
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        self._stats["decode_tokens"] += 1
        if row.followup_at is not None:  # a Followup ends by EOS or its own budget only
            f = row.params.followup
            assert f is not None
            if not row.forced and token in self.eos_token_ids:
                row.finish_reason = "eos"
            elif len(row.token_ids) >= row.followup_at + len(f.token_ids) + f.max_new_tokens:
                row.finish_reason = "length"
            return
        if token in self.eos_token_ids:
            row.finish_reason = "eos"
        elif token in row.params.stop_token_ids:
            row.finish_reason = "stop"
        elif row.params.stop_strings and self._ends_with_stop_string(row):
            row.finish_reason = "stop"
        elif len(row.token_ids) >= row.max_new_tokens:
            row.finish_reason = "length"

    def _ends_with_stop_string(self, row: _Row) -> bool:
        """Decode only the tail: a stop string completed by this token lies within it."""
        window = max(len(s) for s in row.params.stop_strings) + STOP_WINDOW_EXTRA_TOKENS
        tail = self.tokenizer.decode(row.token_ids[-window:])
        return any(s in tail for s in row.params.stop_strings)

    def _to_sample(self, row: _Row) -> Sample:
        assert row.finish_reason is not None
        sample = Sample(list(row.token_ids), list(row.logprobs), row.finish_reason, followup_at=row.followup_at)
        if self.tokenizer is None:
            return sample
        if row.followup_at is None:
            sample.text = self.decode_text(row.token_ids, row.finish_reason, row.params)
        else:
            assert row.own_finish is not None
            own = row.token_ids[: row.followup_at]
            rest = row.token_ids[row.followup_at:]
            if row.finish_reason == "eos":
                rest = rest[:-1]
            # The own part decodes as if it had ended there (its EOS was dropped already).
            sample.text = (self.decode_text(own, "length", row.params)
                           + self.tokenizer.decode(rest))
        return sample
