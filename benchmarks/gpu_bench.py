"""One-GPU benchmark: SFT and DPO step MFU, generation tokens/s against the bandwidth bound, log-prob kernel.

    bash benchmarks/gpu_check.sh                          # the way to run it on the GPU machine
    python benchmarks/gpu_bench.py                        # CUDA: ~1.1B Llama, writes benchmarks/results/
    python benchmarks/gpu_bench.py --device cpu --out F   # the same code on a tiny model (smoke test)
    python benchmarks/gpu_bench.py --dry-run              # the plan and an empty table, no compute

Four parts, each timed on its own and recorded even when another fails (`--isolate`: each in
its own process, killed when it outlives its share of `--time-budget-s`; the short parts first):

1. sft: BF16 SFT steps of a random-init Llama (TinyLlama-1.1B shape: 22 layers, hidden 2048,
   FFN 5632, 32 heads, 4 KV groups, vocabulary 32000; Megatron-Core local layer spec, no
   Transformer Engine) through `megatron_selfreward.train.run_sft`: tokens/s over the steps after
   the warm-up ones, and MFU = tokens/s x `perf/flops.py` FLOPs per token (causal attention
   halved, at the mean real sequence length) / the device's dense BF16 peak.
2. dpo: BF16 DPO steps of the same model through `megatron_selfreward.train.run_dpo` (the
   reference log-probs first, one forward over all pairs, then the policy steps). FLOPs: a
   step's policy forward + backward over the chosen and rejected sequences = tokens x F, with F
   the training FLOPs per token of (1) at the mean real length of those sequences; the
   reference forward over the same sequences = tokens x F / 3 (Megatron's formula counts three
   GEMMs per weight, one forward and two backward). run_dpo computes the reference once, before
   the first step; each measured step is charged its pairs' share of that time. MFU = (policy +
   reference FLOPs) / (step time + reference share) / peak; the policy-only and reference-only
   figures are recorded too. The reference time includes the model's first forward.
3. generate: `MegatronEngine` greedy decoding at batch 1 and 64 (random prompts, no EOS so every
   row runs to max_new_tokens): prefill and decode tokens/s from the engine counters, and the
   fraction of the memory-bandwidth bound reached by decode. Bound per decode step: every GEMM
   weight read once (embedding lookups excluded) + each row's KV cache read at its context
   length (mean context = prompt + new/2), at the GPU's HBM bandwidth (datasheet, by device
   name: H200 4.8 TB/s, H100 SXM 3.35 TB/s; `--bandwidth-tb-s` overrides);
   bound tokens/s = batch / (bytes per step / bandwidth).
4. logprobs: `kernels/logprobs.py` (Triton; and its plain-torch chunked fallback) against the
   torch reference that materialises fp32 [T, V] logits: forward + backward time (median) and
   peak memory above the inputs.

Writes JSON (date, command, hardware, versions, settings, results, errors) and a markdown table
beside it (after every part under `--isolate`); prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("megatron_selfreward") is None:  # not installed, not on PYTHONPATH
    sys.path.insert(0, str(REPO))

NA = "-"


@dataclass(frozen=True)
class Shape:
    """Model and workload sizes of one mode."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int
    seq_len: int
    global_batch: int
    micro_batch: int
    train_steps: int
    warmup_steps: int
    prompt_tokens: int
    new_tokens: int
    batches: tuple[int, ...]
    logprob_tokens: int
    logprob_vocabs: tuple[int, ...]
    dpo_seq_len: int  # prompt + response, each of the pair's two sequences
    dpo_global_batch: int  # pairs per step
    dpo_micro_batch: int  # pairs per micro-batch (2x the sequences)
    dpo_steps: int
    dpo_warmup_steps: int

    def overrides(self, dtype: str) -> list[str]:
        return [f"model.num_layers={self.layers}", f"model.hidden_size={self.hidden}",
                f"model.ffn_hidden_size={self.ffn}", f"model.num_attention_heads={self.heads}",
                f"model.num_query_groups={self.groups}", f"model.vocab_size={self.vocab}",
                f"model.max_seq_len={max(self.seq_len, self.dpo_seq_len, self.prompt_tokens + self.new_tokens)}",
                "model.tie_embeddings=false", f"precision.params_dtype={dtype}",
                f"sft.seq_len={self.seq_len}", f"sft.global_batch_size={self.global_batch}",
                f"sft.micro_batch_size={self.micro_batch}", f"sft.max_steps={self.train_steps}",
                "sft.save_interval_steps=100000", "sft.lr=1e-5", "sft.min_lr=1e-6",
                f"dpo.seq_len={self.dpo_seq_len}", f"dpo.global_batch_size={self.dpo_global_batch}",
                f"dpo.micro_batch_size={self.dpo_micro_batch}", f"dpo.max_steps={self.dpo_steps}",
                "dpo.save_interval_steps=100000",
                # CUDA never runs the CPU decode kernels: off keeps the CPU mode on the GPU's code
                # path (and spares it their first build).
                f"generation.batch_size={max(self.batches)}", "generation.cpu_kernels=off"]

    def with_steps(self, steps: int) -> Shape:
        """The same shape with `steps` SFT and DPO steps (warm-up shortened to leave one measured)."""
        return Shape(**{**self.__dict__, "train_steps": steps, "warmup_steps": min(self.warmup_steps, steps - 1),
                        "dpo_steps": steps, "dpo_warmup_steps": min(self.dpo_warmup_steps, steps - 1)})


# SFT micro-batch 1 and DPO micro-batch 2 pairs (4 x 1024): the local spec's unfused attention
# keeps [batch, heads, s, s] scores for backward (fp32 softmax + bf16 probs, ~1 GB a layer at
# 1 x 2048), which fits an H100's 80 GB next to the 1.1B model's ~20 GB of weights, grads and
# Adam state.
GPU_SHAPE = Shape("llama-1.1b (TinyLlama shape)", layers=22, hidden=2048, ffn=5632, heads=32, groups=4,
                  vocab=32000, seq_len=2048, global_batch=16, micro_batch=1, train_steps=10, warmup_steps=3,
                  prompt_tokens=128, new_tokens=128, batches=(1, 64), logprob_tokens=8192,
                  logprob_vocabs=(32000, 128256), dpo_seq_len=1024, dpo_global_batch=16, dpo_micro_batch=2,
                  dpo_steps=6, dpo_warmup_steps=2)
CPU_SHAPE = Shape("tiny (tests' preset shape)", layers=2, hidden=64, ffn=160, heads=4, groups=2, vocab=512,
                  seq_len=128, global_batch=4, micro_batch=2, train_steps=4, warmup_steps=1,
                  prompt_tokens=16, new_tokens=16, batches=(1, 4), logprob_tokens=256, logprob_vocabs=(512,),
                  dpo_seq_len=128, dpo_global_batch=4, dpo_micro_batch=2, dpo_steps=3, dpo_warmup_steps=1)

PARTS = ("sft", "dpo", "generate", "logprobs")
# Under --isolate a part may run for its share of the time left, over the shares of the parts
# still to run: time a part leaves over goes to the later ones. The short parts run first, so
# what they leave goes to the training parts (each also writes and deletes a checkpoint).
PART_SHARES = {"sft": 0.32, "dpo": 0.32, "generate": 0.18, "logprobs": 0.18}
ISOLATED_ORDER = ("logprobs", "generate", "sft", "dpo")

# Datasheet HBM bandwidth in bytes/s by torch.cuda.get_device_name() spelling, first match wins
# (specific names first: "H100 NVL" and "H100 PCIe" before the SXM default for "H100").
HBM_BYTES_PER_S = (("h200", 4.8e12), ("h100 nvl", 3.9e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12))


# ---------------------------------------------------------------------------------------------
# Shared helpers


def gemm_params(s: Shape) -> int:
    """Weights every decode step reads: attention + MLP GEMMs + norms per layer, output layer."""
    d = s.hidden // s.heads
    per_layer = 2 * s.hidden * s.hidden + 2 * s.hidden * s.groups * d + 3 * s.hidden * s.ffn + 2 * s.hidden
    return s.layers * per_layer + s.hidden * s.vocab + s.hidden


def kv_bytes_per_token(s: Shape, dtype_bytes: int) -> int:
    return s.layers * 2 * s.groups * (s.hidden // s.heads) * dtype_bytes


def decode_bound_tokens_per_s(s: Shape, batch: int, bandwidth_b_s: float, dtype_bytes: int = 2) -> float:
    """Tokens/s if each decode step only had to read the weights and the batch's KV cache once."""
    mean_context = s.prompt_tokens + s.new_tokens / 2
    step_bytes = gemm_params(s) * dtype_bytes + batch * mean_context * kv_bytes_per_token(s, dtype_bytes)
    return batch * bandwidth_b_s / step_bytes


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def hardware(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
                            "python": platform.python_version(), "torch": torch.__version__}
    for module in ("megatron.core", "triton"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            info[module.split(".")[0] + ("_core" if "." in module else "")] = getattr(mod, "__version__", "?")
        except Exception as err:  # noqa: BLE001 - absent or broken: say which
            info[module] = f"not importable ({type(err).__name__})"
    try:
        import transformer_engine  # noqa: F401

        info["transformer_engine"] = "installed (not used: local spec)"
    except Exception:  # noqa: BLE001
        info["transformer_engine"] = "absent"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda})
    return info


def peak_flop_s(device: str, dtype: str) -> tuple[float, str]:
    import torch

    from megatron_selfreward.perf.flops import PEAK_BF16_FLOPS, measure_matmul_flops, peak_key_for_device_name

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        key = peak_key_for_device_name(name)
        if key is None:
            raise KeyError(f"no dense BF16 peak known for {name!r} (perf/flops.py PEAK_BF16_FLOPS)")
        return float(PEAK_BF16_FLOPS[key]), f"datasheet dense BF16 ({key})"
    torch_dtype = getattr(torch, dtype)
    return measure_matmul_flops(n=512, dtype=torch_dtype, repeats=5), f"measured {dtype} 512^3 matmul"


# ---------------------------------------------------------------------------------------------
# Parts


def bandwidth_for(device: str, gpu_name: str | None, override_tb_s: float | None) -> tuple[float | None, str]:
    """(HBM bytes/s for the decode bound, where the figure came from); None when unknown."""
    if override_tb_s:
        return override_tb_s * 1e12, "--bandwidth-tb-s"
    if device != "cuda":
        return 4.8e12, "H200's 4.8 TB/s (CPU mode: exercises the code, the fraction means nothing)"
    lowered = (gpu_name or "").lower()
    for needle, value in HBM_BYTES_PER_S:
        if needle in lowered:
            return value, f"datasheet HBM bandwidth ({needle})"
    return None, f"no HBM bandwidth known for {gpu_name!r}: pass --bandwidth-tb-s"


def _text(seed: str, chars: int) -> str:
    """`chars` characters (= byte tokens) of repeated text."""
    return (seed * (chars // len(seed) + 1))[:chars]


def _measured(records: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    return records[warmup:] or records


def bench_sft(cfg: Any, s: Shape, device: str, dtype: str, work_dir: str | None = None) -> dict[str, Any]:
    """SFT steps through the project's trainer; MFU over the steps after the warm-up."""
    import torch

    from megatron_selfreward.perf.accounting import CAUSAL_HALVED
    from megatron_selfreward.perf.flops import LlamaShape, training_flops_per_token
    from megatron_selfreward.records import SFTExample
    from megatron_selfreward.train import run_sft
    from megatron_selfreward.train.loop import read_metrics

    # Byte-level tokenizer: one token per byte; the chat template adds a few dozen tokens.
    chars = max(s.seq_len - 64, 8) // 2
    examples = [SFTExample(messages=[{"role": "user", "content": _text(f"q{i} ", chars)},
                                     {"role": "assistant", "content": _text(f"a{i} ", chars)}])
                for i in range(s.global_batch * s.train_steps)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_bench_sft_", dir=work_dir) as out:
        run_sft(cfg, examples, None, out, resume=False)
        records = read_metrics(out)
    stage_wall_s = time.perf_counter() - started
    measured = _measured(records, s.warmup_steps)
    tokens = sum(r["tokens"] for r in measured)
    seconds = sum(r["step_time_s"] for r in measured)
    seq = min(tokens / (len(measured) * s.global_batch), s.seq_len)
    shape = LlamaShape(s.layers, s.hidden, s.ffn, s.heads, s.groups, s.vocab)
    per_token = training_flops_per_token(shape, seq, causal_halved=CAUSAL_HALVED)
    peak, source = peak_flop_s(device, dtype)
    tokens_per_s = tokens / seconds
    return {"steps_measured": len(measured), "steps_warmup": len(records) - len(measured), "tokens": tokens,
            "step_time_s_mean": seconds / len(measured), "tokens_per_s": tokens_per_s,
            "attention_seq_len": seq, "flops_per_token": per_token, "causal_attention_halved": CAUSAL_HALVED,
            "model_flop_s": tokens_per_s * per_token, "peak_flop_s": peak, "peak_source": source,
            "mfu": tokens_per_s * per_token / peak, "final_loss": records[-1]["loss"],
            "stage_wall_s": stage_wall_s,
            "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def bench_dpo(cfg: Any, s: Shape, device: str, dtype: str, work_dir: str | None = None) -> dict[str, Any]:
    """DPO steps through the project's trainer; MFU with the reference forward (module docstring)."""
    import torch

    from megatron_selfreward.perf.accounting import CAUSAL_HALVED
    from megatron_selfreward.perf.flops import LlamaShape, training_flops_per_token
    from megatron_selfreward.records import PreferencePair
    from megatron_selfreward.train import run_dpo
    from megatron_selfreward.train.loop import read_metrics

    prompt_chars = s.dpo_seq_len // 4
    response_chars = s.dpo_seq_len - prompt_chars - 64  # room for the chat template's tokens
    pairs = [PreferencePair(prompt_id=f"p{i}", prompt=_text(f"q{i} ", prompt_chars),
                            chosen=_text(f"good {i} ", response_chars), rejected=_text(f"bad {i} ", response_chars),
                            chosen_score=5.0, rejected_score=1.0)
             for i in range(s.dpo_global_batch * s.dpo_steps)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_bench_dpo_", dir=work_dir) as out:
        summary = run_dpo(cfg, pairs, None, out, resume=False)
        records = read_metrics(out)
    stage_wall_s = time.perf_counter() - started
    measured = _measured(records, s.dpo_warmup_steps)
    tokens = sum(r["tokens"] for r in measured)  # chosen + rejected sequences, prompts in both
    tokens_all = sum(r["tokens"] for r in records)
    step_s = sum(r["step_time_s"] for r in measured)
    reference_s = summary["reference_time_s"] * tokens / tokens_all  # the measured pairs' share
    seq = min(tokens / (len(measured) * s.dpo_global_batch * 2), s.dpo_seq_len)
    shape = LlamaShape(s.layers, s.hidden, s.ffn, s.heads, s.groups, s.vocab)
    per_token = training_flops_per_token(shape, seq, causal_halved=CAUSAL_HALVED)
    policy_flops, reference_flops = tokens * per_token, tokens * per_token / 3
    peak, source = peak_flop_s(device, dtype)
    return {"steps_measured": len(measured), "steps_warmup": len(records) - len(measured),
            "pairs_per_step": s.dpo_global_batch, "tokens": tokens,
            "pairs_truncated": summary["data"].get("truncated"),
            "step_time_s_mean": step_s / len(measured),
            "reference_time_s": summary["reference_time_s"], "reference_pairs": len(pairs),
            "reference_time_s_per_step": reference_s / len(measured),
            "tokens_per_s": tokens / (step_s + reference_s), "policy_tokens_per_s": tokens / step_s,
            "attention_seq_len": seq, "flops_per_token": per_token, "causal_attention_halved": CAUSAL_HALVED,
            "policy_flops": policy_flops, "reference_flops": reference_flops,
            "model_flop_s": (policy_flops + reference_flops) / (step_s + reference_s),
            "peak_flop_s": peak, "peak_source": source,
            "mfu": (policy_flops + reference_flops) / (step_s + reference_s) / peak,
            "mfu_policy_steps": policy_flops / step_s / peak,
            "mfu_reference_forward": reference_flops / reference_s / peak,
            "final_loss": records[-1]["loss"], "stage_wall_s": stage_wall_s,
            "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def bench_generate(cfg: Any, s: Shape, device: str, bandwidth_b_s: float | None) -> list[dict[str, Any]]:
    import torch

    from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
    from megatron_selfreward.generation.megatron_engine import MegatronEngine
    from megatron_selfreward.megatron.model import build_model

    model = build_model(cfg)
    model.eval()
    engine = MegatronEngine(model, cfg, None, eos_token_ids=[], max_batch_size=max(s.batches))
    gen = torch.Generator().manual_seed(0)
    dtype_bytes = 2 if cfg.precision.params_dtype != "float32" else 4
    rows = []
    for batch in s.batches:
        def requests(new: int, tag: str) -> list[GenerationRequest]:
            return [GenerationRequest(f"{tag}{i}", torch.randint(300, s.vocab, (s.prompt_tokens,), generator=gen).tolist(),
                                      SamplingParams(temperature=0.0, max_new_tokens=new)) for i in range(batch)]

        engine.generate(requests(4, "warm"))  # allocator, kernels, caches
        _sync(device)
        engine.reset_stats()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        engine.generate(requests(s.new_tokens, "run"))
        _sync(device)
        wall = time.perf_counter() - started
        st = engine.stats
        decode_tps = st["decode_tokens"] / st["decode_time_s"] if st["decode_time_s"] else None
        bound = decode_bound_tokens_per_s(s, batch, bandwidth_b_s, dtype_bytes) if bandwidth_b_s else None
        rows.append({"batch": batch, "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                     "prefill_tokens": st["prefill_tokens_computed"],
                     "prefill_tokens_per_s": st["prefill_tokens_computed"] / st["prefill_time_s"]
                     if st["prefill_time_s"] else None,
                     "decode_tokens": st["decode_tokens"], "decode_tokens_per_s": decode_tps,
                     "decode_bound_tokens_per_s": bound,
                     "bandwidth_fraction": decode_tps / bound if decode_tps and bound else None,
                     "wall_time_s": wall,
                     "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
    del engine, model
    return rows


def _time_fwd_bwd(fn: Callable[..., Any], h: Any, w: Any, y: Any, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward, and peak bytes allocated above the inputs (CUDA)."""
    import torch

    def once() -> None:
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        fn(hh, ww, y).sum().backward()

    once()  # warm-up / compile
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - started)
    peak = math.nan
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        once()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


def bench_logprobs(s: Shape, device: str, repeats: int) -> list[dict[str, Any]]:
    import torch

    from megatron_selfreward.kernels.logprobs import chunked_logprobs_torch, triton_logprobs, triton_usable
    from megatron_selfreward.kernels.logprobs_ref import logprobs_reference

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls: list[tuple[str, Callable[..., Any]]] = [("reference (fp32 [T, V] logits)", logprobs_reference),
                                                   ("torch chunked", chunked_logprobs_torch)]
    if triton_usable(torch.device(device)):
        impls.insert(0, ("triton", triton_logprobs))
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for vocab in s.logprob_vocabs:
        h = (torch.randn(s.logprob_tokens, s.hidden, generator=gen) * 0.5).to(device, dtype)
        w = (torch.randn(vocab, s.hidden, generator=gen) * 0.02).to(device, dtype)
        y = torch.randint(0, vocab, (s.logprob_tokens,), generator=gen).to(device)
        reference = None
        for name, fn in impls:
            seconds, peak = _time_fwd_bwd(fn, h, w, y, device, repeats)
            with torch.no_grad():
                values = fn(h, w, y).float()
            reference = values if reference is None and name.startswith("reference") else reference
            rows.append({"impl": name, "tokens": s.logprob_tokens, "hidden": s.hidden, "vocab": vocab,
                         "dtype": str(dtype).replace("torch.", ""), "fwd_bwd_ms": seconds * 1e3,
                         "peak_extra_gib": None if math.isnan(peak) else peak / 2**30, "_values": values})
        ref = next(r["_values"] for r in rows if r["vocab"] == vocab and r["impl"].startswith("reference"))
        for r in rows:
            if r["vocab"] == vocab and "_values" in r:
                r["max_abs_diff_vs_reference"] = float((r.pop("_values") - ref).abs().max())
        del h, w, y
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def _f(value: Any, fmt: str) -> str:
    return NA if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_table(result: dict[str, Any]) -> str:
    """The four parts as fixed-width text tables (what is printed and written to the .md)."""
    hw = result.get("hardware", {})
    settings = result["settings"]
    lines = [f"# {result['benchmark']} - {result['date']}", "",
             f"{hw.get('gpu', 'CPU ' + str(hw.get('cpu', '?')))}; torch {hw.get('torch', '?')}, "
             f"megatron-core {hw.get('megatron_core', '?')}, triton {hw.get('triton', '?')}; "
             f"model {settings['shape']['name']}", "",
             f"## SFT step ({settings['dtype']})", "",
             "| tokens/s | step (s) | attention seq | GFLOP/token | model TFLOP/s | peak TFLOP/s | MFU | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    t = result["results"].get("sft")
    if t:
        lines.append(f"| {_f(t['tokens_per_s'], ',.0f')} | {_f(t['step_time_s_mean'], '.3f')} | "
                     f"{_f(t['attention_seq_len'], '.0f')} | {_f(t['flops_per_token'] / 1e9, '.2f')} | "
                     f"{_f(t['model_flop_s'] / 1e12, '.1f')} | {_f(t['peak_flop_s'] / 1e12, '.1f')} | "
                     f"{_f(100 * t['mfu'], '.1f')}% | {_f(t.get('peak_cuda_allocated_gib'), '.1f')} |")
    else:
        lines.append("| " + " | ".join([NA] * 8) + " |")
    d = result["results"].get("dpo")
    lines += ["", f"## DPO step ({settings['dtype']}; policy forward + backward on chosen and rejected, "
                  "plus the step's share of the reference forward)", "",
              "| pairs/step | tokens/s | step (s) | reference (s/step) | attention seq | model TFLOP/s | MFU "
              "| MFU policy only | MFU reference only | peak mem (GiB) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    if d:
        lines.append(f"| {d['pairs_per_step']} | {_f(d['tokens_per_s'], ',.0f')} | {_f(d['step_time_s_mean'], '.3f')} | "
                     f"{_f(d['reference_time_s_per_step'], '.3f')} | {_f(d['attention_seq_len'], '.0f')} | "
                     f"{_f(d['model_flop_s'] / 1e12, '.1f')} | {_f(100 * d['mfu'], '.1f')}% | "
                     f"{_f(100 * d['mfu_policy_steps'], '.1f')}% | {_f(100 * d['mfu_reference_forward'], '.1f')}% | "
                     f"{_f(d.get('peak_cuda_allocated_gib'), '.1f')} |")
    else:
        lines.append("| " + " | ".join([NA] * 10) + " |")
    peak_source = (t or d or {}).get("peak_source", "dense BF16 datasheet peak of the GPU")
    lines += ["", f"MFU: perf/flops.py model FLOPs (causal attention halved) / {peak_source}. DPO: policy "
                  "tokens x F + reference tokens x F/3 over step time + the reference forward's share.", "",
              "## Generation (MegatronEngine, greedy, no EOS)", "",
              "| batch | prompt+new | prefill tok/s | decode tok/s | bound tok/s | of bound | peak mem (GiB) |",
              "|---|---|---|---|---|---|---|"]
    for g in result["results"].get("generate") or [{"batch": b} for b in settings["shape"]["batches"]]:
        lines.append(f"| {g['batch']} | {g.get('prompt_tokens', NA)}+{g.get('new_tokens', NA)} | "
                     f"{_f(g.get('prefill_tokens_per_s'), ',.0f')} | {_f(g.get('decode_tokens_per_s'), ',.0f')} | "
                     f"{_f(g.get('decode_bound_tokens_per_s'), ',.0f')} | "
                     f"{_f(100 * g['bandwidth_fraction'] if g.get('bandwidth_fraction') else None, '.1f')}% | "
                     f"{_f(g.get('peak_cuda_allocated_gib'), '.1f')} |")
    lines += ["", f"Bound: weights + KV cache read once per decode step at "
                  f"{_f(settings.get('bandwidth_tb_s'), 'g')} TB/s ({settings.get('bandwidth_source', '?')}).", "",
              "## Log-prob kernel (forward + backward)", "",
              "| impl | T x H x V | dtype | time (ms) | peak extra (GiB) | max abs diff vs reference |",
              "|---|---|---|---|---|---|"]
    for r in result["results"].get("logprobs") or []:
        lines.append(f"| {r['impl']} | {r['tokens']} x {r['hidden']} x {r['vocab']} | {r['dtype']} | "
                     f"{_f(r['fwd_bwd_ms'], '.2f')} | {_f(r.get('peak_extra_gib'), '.2f')} | "
                     f"{_f(r.get('max_abs_diff_vs_reference'), '.2e')} |")
    if not result["results"].get("logprobs"):
        lines.append("| " + " | ".join([NA] * 6) + " |")
    if result.get("timings_s"):
        lines += ["", "Wall time per part (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items())]
    for part, warning in result.get("warnings", {}).items():
        lines += ["", f"**{part}**: {warning}"]
    for part, err in result.get("errors", {}).items():
        lines += ["", f"**{part} failed**: {err.strip().splitlines()[-1] if err.strip() else '?'}"]
    return "\n".join(lines) + "\n"


def _world(device: str, seed: int) -> Any:
    """A one-process world with megatron's parallel state (NCCL on CUDA, gloo on CPU)."""
    from megatron_selfreward.megatron.parallel import single_process_world

    return single_process_world(seed, backend="nccl" if device == "cuda" else "gloo")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower().replace("nvidia ", ""))


def output_path(args: argparse.Namespace, result: dict[str, Any]) -> Path | None:
    """--out; else gpu_<device>.json in --out-dir (on CUDA by default benchmarks/results/)."""
    if args.out:
        return Path(args.out)
    if args.out_dir is None and args.device != "cuda":
        return None
    gpu = result.get("hardware", {}).get("gpu")
    slug = _slug(gpu) if gpu else ("cpu" if args.device == "cpu" else "unknown_gpu")
    return Path(args.out_dir or REPO / "benchmarks" / "results") / f"gpu_{slug}.json"


def write_result(result: dict[str, Any], path: Path) -> str:
    """JSON and the markdown table beside it, each by atomic rename; returns the table."""
    table = format_table(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, json.dumps(result, indent=2, default=str) + "\n"),
                         (path.with_suffix(".md"), table + f"\nCommand: `{result['command']}`\n")):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the ~1.1B benchmark; cpu: the same code on the tiny shape (smoke test)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", help="JSON path; a .md table is written beside it")
    p.add_argument("--out-dir", help="write gpu_<device>.json/.md here (default on CUDA: benchmarks/results; "
                                     "on CPU nothing is written unless --out or --out-dir is given)")
    p.add_argument("--bandwidth-tb-s", type=float, default=None,
                   help="HBM bandwidth for the decode bound (default: by GPU name, H200 4.8, H100 SXM 3.35)")
    p.add_argument("--train-steps", type=int, default=0, help="override the shape's SFT and DPO steps")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the log-prob kernels")
    p.add_argument("--work-dir", help="where the SFT/DPO parts write their (deleted) checkpoints "
                                      "(default: the system temp dir; ~17 GB each on CUDA)")
    p.add_argument("--isolate", action="store_true",
                   help="run each part in its own process, killed after its share of --time-budget-s")
    p.add_argument("--time-budget-s", type=float, default=330.0,
                   help="--isolate: seconds for all parts together (default 330)")
    p.add_argument("--log-dir", help="--isolate: keep each part's output here as gpu_bench_<part>.log")
    p.add_argument("--dry-run", action="store_true", help="print the plan and an empty table; compute nothing")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.train_steps and args.train_steps < 2:
        p.error("--train-steps: at least 2 (one warm-up step, one measured)")
    return args


def _kill_group(proc: subprocess.Popen) -> None:
    """End a part and whatever it started (checkpoint helpers) by its process group."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


MIN_PART_S = 10  # a part given less is not started


def part_command(args: argparse.Namespace, part: str, part_json: Path, work_dir: str) -> list[str]:
    """This script for one part, in-process, writing its result to `part_json`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--parts", part,
           "--out", str(part_json), "--work-dir", work_dir, "--repeats", str(args.repeats)]
    cmd += ["--train-steps", str(args.train_steps)] if args.train_steps else []
    cmd += ["--bandwidth-tb-s", str(args.bandwidth_tb_s)] if args.bandwidth_tb_s else []
    return cmd


def run_isolated(args: argparse.Namespace, result: dict[str, Any], parts: list[str]) -> int:
    """Each part in a child process of this script, under a timeout; results merged, written after each."""
    deadline = time.monotonic() + args.time_budget_s
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    parts = sorted(parts, key=ISOLATED_ORDER.index)
    with tempfile.TemporaryDirectory(prefix="gpu_bench_parts_") as tmp:
        for i, part in enumerate(parts):
            timeout = (deadline - time.monotonic()) * PART_SHARES[part] / sum(PART_SHARES[p] for p in parts[i:])
            if timeout < MIN_PART_S:
                result["errors"][part] = f"TimeoutError: part {part!r} not started: the time budget is spent"
                continue
            part_json = Path(tmp) / f"{part}.json"
            log = (log_dir or Path(tmp)) / f"gpu_bench_{part}.log"
            work = tempfile.mkdtemp(prefix=f"gpu_bench_{part}_", dir=args.work_dir)
            print(f"=== {part}: up to {timeout:.0f} s (log {log})", flush=True)
            started = time.monotonic()
            with log.open("w") as out:
                # A session of its own: the timeout ends the part and its helpers together.
                proc = subprocess.Popen(part_command(args, part, part_json, work), cwd=REPO, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc: int | None = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    rc = None
            elapsed = time.monotonic() - started
            shutil.rmtree(work, ignore_errors=True)
            tail = _tail(log)
            result["timings_s"][part] = round(elapsed, 1)
            print(f"=== {part}: exit {'timeout' if rc is None else rc} after {elapsed:.0f} s", flush=True)
            if part_json.is_file():  # also when killed: a part writes its result before tearing down
                child = json.loads(part_json.read_text())
                result["results"].update(child["results"])
                result["errors"].update(child["errors"])
                if child.get("hardware") and "hardware" not in result:
                    result["hardware"] = child["hardware"]
                for key in ("bandwidth_tb_s", "bandwidth_source"):
                    if part == "generate" or result["settings"].get(key) is None:
                        result["settings"][key] = child["settings"].get(key)
                if rc is None:
                    result.setdefault("warnings", {})[part] = f"killed after {elapsed:.0f} s, after writing its results"
            elif rc is None:
                result["errors"][part] = (f"{tail}\nTimeoutError: part {part!r} killed after {elapsed:.0f} s "
                                          f"(its share of the {args.time_budget_s:.0f} s budget)")
            else:
                result["errors"][part] = f"{tail}\nRuntimeError: part {part!r} exited {rc} without writing results"
            if part in result["errors"]:
                print(tail, flush=True)
            if "hardware" in result:
                _write_isolated(args, result)
    if "hardware" not in result:  # no part got as far as saying what it ran on
        try:
            result["hardware"] = hardware(args.device)
        except Exception as err:  # noqa: BLE001 - the table still says what ran
            result["hardware"] = {"cpu": platform.machine(), "error": f"{type(err).__name__}: {err}"}
    _write_isolated(args, result)
    print(format_table(result))
    return 1 if result["errors"] else 0


def _write_isolated(args: argparse.Namespace, result: dict[str, Any]) -> None:
    path = output_path(args, result)
    if path:
        write_result(result, path)
        print(f"wrote {path} and {path.with_suffix('.md')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = CPU_SHAPE if args.device == "cpu" else GPU_SHAPE
    if args.train_steps:
        shape = shape.with_steps(args.train_steps)
    parts = args.parts.split(",")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    result: dict[str, Any] = {
        "benchmark": "gpu_bench" if args.device == "cuda" else "gpu_bench (cpu smoke mode)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"device": args.device, "dtype": dtype, "parts": parts, "shape": shape.__dict__,
                     "bandwidth_tb_s": args.bandwidth_tb_s, "gemm_params": gemm_params(shape)},
        "results": {}, "errors": {}, "timings_s": {},
    }
    if args.dry_run:
        result["hardware"] = {"cpu": platform.processor() or platform.machine(), "torch": "(dry run)"}
        print(json.dumps(result["settings"], indent=2))
        print(format_table(result))
        return 0
    if args.isolate:
        return run_isolated(args, result, parts)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible (torch.cuda.is_available() is False). This benchmark "
              "needs one GPU; use --device cpu for the tiny CPU smoke mode or --dry-run to see the plan.",
              file=sys.stderr)
        return 2
    result["hardware"] = hardware(args.device)
    bandwidth, bandwidth_source = bandwidth_for(args.device, result["hardware"].get("gpu"), args.bandwidth_tb_s)
    result["settings"].update(bandwidth_tb_s=bandwidth / 1e12 if bandwidth else None, bandwidth_source=bandwidth_source)
    from megatron_selfreward.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", shape.overrides(dtype))
    if args.device == "cuda":  # cuBLAS and allocator start-up, so no part's first GEMM pays it
        torch.ones(256, 256, device="cuda", dtype=torch.bfloat16).matmul(torch.ones(256, 256, device="cuda",
                                                                                      dtype=torch.bfloat16))
        torch.cuda.synchronize()
    path = output_path(args, result)
    with _world(args.device, cfg.pipeline.seed):
        for part in parts:
            started = time.perf_counter()
            try:
                if part == "sft":
                    result["results"]["sft"] = bench_sft(cfg, shape, args.device, dtype, args.work_dir)
                elif part == "dpo":
                    result["results"]["dpo"] = bench_dpo(cfg, shape, args.device, dtype, args.work_dir)
                elif part == "generate":
                    result["results"]["generate"] = bench_generate(cfg, shape, args.device, bandwidth)
                else:
                    result["results"]["logprobs"] = bench_logprobs(shape, args.device, args.repeats)
            except Exception:  # noqa: BLE001 - record it, run the other parts
                result["errors"][part] = traceback.format_exc()
                print(result["errors"][part], file=sys.stderr)
            result["timings_s"][part] = round(time.perf_counter() - started, 1)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        # Written before the process group is torn down, so a hang there loses nothing.
        table = write_result(result, path) if path else format_table(result)
    print(table)
    if path:
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
