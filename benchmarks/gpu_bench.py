"""One-GPU benchmark: training MFU, generation tokens/s against the bandwidth bound, log-prob kernel.

    python benchmarks/gpu_bench.py                        # CUDA: ~1.1B Llama, writes benchmarks/results/
    python benchmarks/gpu_bench.py --device cpu --out F   # the same code on a tiny model (smoke test)
    python benchmarks/gpu_bench.py --dry-run              # the plan and an empty table, no compute

Three parts, each timed on its own and recorded even when another fails:

1. train: BF16 SFT steps of a random-init Llama (TinyLlama-1.1B shape: 22 layers, hidden 2048,
   FFN 5632, 32 heads, 4 KV groups, vocabulary 32000; Megatron-Core local layer spec, no
   Transformer Engine) through `megatron_selfreward.train.run_sft`: tokens/s over the steps after
   the warm-up ones, and MFU = tokens/s x `perf/flops.py` FLOPs per token (causal attention
   halved, at the mean real sequence length) / the device's dense BF16 peak.
2. generate: `MegatronEngine` greedy decoding at batch 1 and 64 (random prompts, no EOS so every
   row runs to max_new_tokens): prefill and decode tokens/s from the engine counters, and the
   fraction of the memory-bandwidth bound reached by decode. Bound per decode step: every GEMM
   weight read once (embedding lookups excluded) + each row's KV cache read at its context
   length (mean context = prompt + new/2), at `--bandwidth-tb-s` (H200: 4.8 TB/s);
   bound tokens/s = batch / (bytes per step / bandwidth).
3. logprobs: `kernels/logprobs.py` (Triton; and its plain-torch chunked fallback) against the
   torch reference that materialises fp32 [T, V] logits: forward + backward time (median) and
   peak memory above the inputs.

Writes JSON (date, command, hardware, versions, settings, results, errors) and a markdown table
beside it; prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
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

    def overrides(self, dtype: str) -> list[str]:
        return [f"model.num_layers={self.layers}", f"model.hidden_size={self.hidden}",
                f"model.ffn_hidden_size={self.ffn}", f"model.num_attention_heads={self.heads}",
                f"model.num_query_groups={self.groups}", f"model.vocab_size={self.vocab}",
                f"model.max_seq_len={max(self.seq_len, self.prompt_tokens + self.new_tokens)}",
                "model.tie_embeddings=false", f"precision.params_dtype={dtype}",
                f"sft.seq_len={self.seq_len}", f"sft.global_batch_size={self.global_batch}",
                f"sft.micro_batch_size={self.micro_batch}", f"sft.max_steps={self.train_steps}",
                "sft.save_interval_steps=100000", "sft.lr=1e-5", "sft.min_lr=1e-6",
                f"generation.batch_size={max(self.batches)}"]


GPU_SHAPE = Shape("llama-1.1b (TinyLlama shape)", 22, 2048, 5632, 32, 4, 32000, 2048, 16, 2, 10, 3,
                  128, 128, (1, 64), 8192, (32000, 128256))
CPU_SHAPE = Shape("tiny (tests' preset shape)", 2, 64, 160, 4, 2, 512, 128, 4, 2, 4, 1,
                  16, 16, (1, 4), 256, (512,))


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


def bench_train(cfg: Any, s: Shape, device: str, dtype: str) -> dict[str, Any]:
    """SFT steps through the project's trainer; MFU over the steps after the warm-up."""
    import torch

    from megatron_selfreward.perf.accounting import CAUSAL_HALVED
    from megatron_selfreward.perf.flops import LlamaShape, training_flops_per_token
    from megatron_selfreward.records import SFTExample
    from megatron_selfreward.train import run_sft
    from megatron_selfreward.train.loop import read_metrics

    # Byte-level tokenizer: one token per byte; the chat template adds a few dozen tokens.
    chars = max(s.seq_len - 64, 8) // 2
    examples = [SFTExample(messages=[{"role": "user", "content": ("q%d " % i * chars)[:chars]},
                                     {"role": "assistant", "content": ("a%d " % i * chars)[:chars]}])
                for i in range(s.global_batch * s.train_steps)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="gpu_bench_train_") as out:
        run_sft(cfg, examples, None, out, resume=False)
        records = read_metrics(out)
    measured = records[s.warmup_steps:] or records
    tokens = sum(r["tokens"] for r in measured)
    seconds = sum(r["step_time_s"] for r in measured)
    seq = min(tokens / (len(measured) * s.global_batch), s.seq_len)
    shape = LlamaShape(s.layers, s.hidden, s.ffn, s.heads, s.groups, s.vocab)
    per_token = training_flops_per_token(shape, seq, causal_halved=CAUSAL_HALVED)
    peak, source = peak_flop_s(device, dtype)
    tokens_per_s = tokens / seconds
    return {"steps_measured": len(measured), "steps_warmup": s.warmup_steps, "tokens": tokens,
            "step_time_s_mean": seconds / len(measured), "tokens_per_s": tokens_per_s,
            "attention_seq_len": seq, "flops_per_token": per_token, "causal_attention_halved": CAUSAL_HALVED,
            "model_flop_s": tokens_per_s * per_token, "peak_flop_s": peak, "peak_source": source,
            "mfu": tokens_per_s * per_token / peak, "final_loss": records[-1]["loss"],
            "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def bench_generate(cfg: Any, s: Shape, device: str, bandwidth_b_s: float) -> list[dict[str, Any]]:
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
        bound = decode_bound_tokens_per_s(s, batch, bandwidth_b_s, dtype_bytes)
        rows.append({"batch": batch, "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                     "prefill_tokens": st["prefill_tokens_computed"],
                     "prefill_tokens_per_s": st["prefill_tokens_computed"] / st["prefill_time_s"]
                     if st["prefill_time_s"] else None,
                     "decode_tokens": st["decode_tokens"], "decode_tokens_per_s": decode_tps,
                     "decode_bound_tokens_per_s": bound,
                     "bandwidth_fraction": decode_tps / bound if decode_tps else None,
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

    from kernels.logprobs import chunked_logprobs_torch, triton_logprobs, triton_usable
    from kernels.logprobs_ref import logprobs_reference

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
    """The three parts as fixed-width text tables (what is printed and written to the .md)."""
    hw = result.get("hardware", {})
    lines = [f"# {result['benchmark']} - {result['date']}", "",
             f"{hw.get('gpu', 'CPU ' + str(hw.get('cpu', '?')))}; torch {hw.get('torch', '?')}, "
             f"megatron-core {hw.get('megatron_core', '?')}, triton {hw.get('triton', '?')}; "
             f"model {result['settings']['shape']['name']}", "",
             f"## Training (SFT step, {result['settings']['dtype']})", "",
             "| tokens/s | step (s) | attention seq | GFLOP/token | model TFLOP/s | peak TFLOP/s | MFU | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    t = result["results"].get("train")
    if t:
        lines.append(f"| {_f(t['tokens_per_s'], ',.0f')} | {_f(t['step_time_s_mean'], '.3f')} | "
                     f"{_f(t['attention_seq_len'], '.0f')} | {_f(t['flops_per_token'] / 1e9, '.2f')} | "
                     f"{_f(t['model_flop_s'] / 1e12, '.1f')} | {_f(t['peak_flop_s'] / 1e12, '.1f')} | "
                     f"{_f(100 * t['mfu'], '.1f')}% | {_f(t.get('peak_cuda_allocated_gib'), '.1f')} |")
    else:
        lines.append("| " + " | ".join([NA] * 8) + " |")
    peak_source = t["peak_source"] if t else "dense BF16 datasheet peak of the GPU"
    lines += ["", f"MFU: perf/flops.py model FLOPs (causal attention halved) / {peak_source}.", "",
              "## Generation (MegatronEngine, greedy, no EOS)", "",
              "| batch | prompt+new | prefill tok/s | decode tok/s | bound tok/s | of bound | peak mem (GiB) |",
              "|---|---|---|---|---|---|---|"]
    for g in result["results"].get("generate") or [{"batch": b} for b in result["settings"]["shape"]["batches"]]:
        lines.append(f"| {g['batch']} | {g.get('prompt_tokens', NA)}+{g.get('new_tokens', NA)} | "
                     f"{_f(g.get('prefill_tokens_per_s'), ',.0f')} | {_f(g.get('decode_tokens_per_s'), ',.0f')} | "
                     f"{_f(g.get('decode_bound_tokens_per_s'), ',.0f')} | "
                     f"{_f(100 * g['bandwidth_fraction'] if g.get('bandwidth_fraction') else None, '.1f')}% | "
                     f"{_f(g.get('peak_cuda_allocated_gib'), '.1f')} |")
    lines += ["", f"Bound: weights + KV cache read once per decode step at "
                  f"{result['settings']['bandwidth_tb_s']} TB/s.", "",
              "## Log-prob kernel (forward + backward)", "",
              "| impl | T x H x V | dtype | time (ms) | peak extra (GiB) | max abs diff vs reference |",
              "|---|---|---|---|---|---|"]
    for r in result["results"].get("logprobs") or []:
        lines.append(f"| {r['impl']} | {r['tokens']} x {r['hidden']} x {r['vocab']} | {r['dtype']} | "
                     f"{_f(r['fwd_bwd_ms'], '.2f')} | {_f(r.get('peak_extra_gib'), '.2f')} | "
                     f"{_f(r.get('max_abs_diff_vs_reference'), '.2e')} |")
    if not result["results"].get("logprobs"):
        lines.append("| " + " | ".join([NA] * 6) + " |")
    for part, err in result.get("errors", {}).items():
        lines += ["", f"**{part} failed**: {err.splitlines()[-1] if err else '?'}"]
    return "\n".join(lines) + "\n"


def _world(device: str, seed: int) -> Any:
    """A one-process world with megatron's parallel state (NCCL on CUDA, gloo on CPU)."""
    from megatron_selfreward.megatron.parallel import single_process_world

    return single_process_world(seed, backend="nccl" if device == "cuda" else "gloo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the ~1.1B benchmark; cpu: the same code on the tiny shape (smoke test)")
    p.add_argument("--parts", default="train,generate,logprobs",
                   help="comma-separated subset of train,generate,logprobs")
    p.add_argument("--out", help="JSON path (default on CUDA: benchmarks/results/gpu_<device>.json; "
                                 "on CPU nothing is written unless given); a .md table is written beside")
    p.add_argument("--bandwidth-tb-s", type=float, default=4.8, help="HBM bandwidth for the decode bound (H200: 4.8)")
    p.add_argument("--train-steps", type=int, default=0, help="override the shape's training steps")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the log-prob kernels")
    p.add_argument("--dry-run", action="store_true", help="print the plan and an empty table; compute nothing")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - {"train", "generate", "logprobs"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from train, generate, logprobs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = CPU_SHAPE if args.device == "cpu" else GPU_SHAPE
    if args.train_steps:
        shape = Shape(**{**shape.__dict__, "train_steps": args.train_steps,
                         "warmup_steps": min(shape.warmup_steps, args.train_steps - 1)})
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
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible (torch.cuda.is_available() is False). This benchmark "
              "needs one GPU; use --device cpu for the tiny CPU smoke mode or --dry-run to see the plan.",
              file=sys.stderr)
        return 2
    result["hardware"] = hardware(args.device)
    from megatron_selfreward.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", shape.overrides(dtype))
    with _world(args.device, cfg.pipeline.seed):
        for part in parts:
            started = time.perf_counter()
            try:
                if part == "train":
                    result["results"]["train"] = bench_train(cfg, shape, args.device, dtype)
                elif part == "generate":
                    result["results"]["generate"] = bench_generate(cfg, shape, args.device, args.bandwidth_tb_s * 1e12)
                else:
                    result["results"]["logprobs"] = bench_logprobs(shape, args.device, args.repeats)
            except Exception:  # noqa: BLE001 - record it, run the other parts
                result["errors"][part] = traceback.format_exc()
                print(result["errors"][part], file=sys.stderr)
            result["timings_s"][part] = round(time.perf_counter() - started, 1)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    table = format_table(result)
    print(table)
    out = args.out
    if out is None and args.device == "cuda":
        slug = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(0).lower().replace("nvidia ", ""))
        out = str(REPO / "benchmarks" / "results" / f"gpu_{slug}.json")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        path.with_suffix(".md").write_text(table + f"\nCommand: `{result['command']}`\n")
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
