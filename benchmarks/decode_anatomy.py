"""Where a decode step's time goes: MegatronEngine vs transformers, and what bounds the ratio.

One decode step (16 rows, 1 new token each, after 100 cached tokens per row) of SmolLM2-135M in
fp32 and bf16, timed as a whole and taken apart:

  ours, step              MegatronRunner.forward (the engine's decode step, logits included)
  ours, weight GEMMs only the same step's GEMMs alone (every layer's packed linears + the head)
  ours, without X         the step with one part replaced by a no-op (attention, RMSNorm)
  (each of these twice: the step's non-GEMM ops as torch ops, and as the C++ kernels of
  kernels/decode_cpu.cpp, generation.cpu_kernels off / on)
  ours, sampling          sample_tokens (T=0.7, top-p 0.9) on the step's logits
  transformers step       LlamaForCausalLM forward with a 100-token DynamicCache, same rows
  transformers sampling   its temperature + top-p warpers and multinomial, as generate runs them

At 16 rows a step reads every weight once, so the weight GEMMs are bound by memory bandwidth
and the same for any engine that reads the same weights in the same dtype: "ceiling" is
transformers' step + sampling divided by our weight GEMMs + our sampling, the speedup an engine
with no other work would reach.

    python benchmarks/decode_anatomy.py [--dtypes float32,bfloat16]   # ~2 min on 2 cores

Writes benchmarks/results/decode_anatomy.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "decode_anatomy.json"
ROWS, CACHED = 16, 100
# generation.cpu_kernels -> how the table names the decode step's non-GEMM ops.
PATHS = {"off": "torch ops", "on": "C++ kernels"}


def timed_ms(step: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `step` over `repeats` calls after three warm-up calls."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def text_rows(tokenizer: Any, vocab: int) -> torch.Tensor:
    """[ROWS, CACHED + 1] token ids: windows of the judge prompt (real text, so the logits have a
    trained model's shape, which sampling cost depends on); random ids without a tokenizer."""
    if tokenizer is None:
        return torch.randint(0, vocab, (ROWS, CACHED + 1), generator=torch.Generator().manual_seed(0))
    from benchmarks.generate_cpu import JUDGED
    from megatron_selfreward.judging.prompt import render_judge_prompt

    ids = tokenizer(" ".join(render_judge_prompt(i, r) for i, r in JUDGED))["input_ids"]
    step = (len(ids) - CACHED - 1) // ROWS
    return torch.tensor([ids[k * step : k * step + CACHED + 1] for k in range(ROWS)])


def ours(model: Any, cfg: Any, dtype: str, tokens: torch.Tensor, repeats: int,
         kernels: str) -> dict[str, float]:
    from megatron_selfreward.kernels import decode_cpu
    from megatron_selfreward.generation import runner as runner_mod
    from megatron_selfreward.generation.megatron_engine import KVCache, MegatronEngine
    from megatron_selfreward.generation.sampling import sample_tokens

    runner = MegatronEngine(model, cfg, tokenizer=None, max_batch_size=ROWS, dtype=dtype,
                            cpu_kernels=kernels).runner
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(CACHED + 1).expand(ROWS, -1)
    valid = torch.ones(ROWS, CACHED + 1, dtype=torch.bool)
    cache = KVCache(ROWS, CACHED + 1, len(runner.layers), runner.device)
    out: dict[str, float] = {}
    with torch.inference_mode():
        runner.prefill(tokens[:, :CACHED], positions[:, :CACHED], valid[:, :CACHED], cache)

        def step() -> torch.Tensor:
            cache.length = CACHED
            return runner.forward(tokens[:, CACHED:], positions[:, CACHED:], valid[:, CACHED:], cache)

        out["full_step_ms"] = timed_ms(step, repeats)
        logits = step()
        temperature, top_p = torch.full((ROWS,), 0.7), torch.full((ROWS,), 0.9)
        top_k, uniform = torch.zeros(ROWS, dtype=torch.long), torch.rand(ROWS, dtype=torch.float64, generator=gen)

        def sample() -> Any:
            with torch._C.DisableTorchFunction():
                return sample_tokens(logits, temperature, top_k, top_p, uniform)

        out["sampling_ms"] = timed_ms(sample, repeats)
        hidden = torch.randn(ROWS, 1, cfg.model.hidden_size, generator=gen).to(runner.dtype)
        step_out = runner.direct[0].fc2.weight.shape[1]
        inner = torch.randn(ROWS, 1, step_out, generator=gen).to(runner.dtype)

        def gemms() -> None:
            with torch._C.DisableTorchFunction():
                for w in runner.direct:
                    qkv = w.qkv(hidden)
                    w.proj.add(qkv[..., : hidden.shape[-1]], hidden)
                    w.up.mul(hidden, w.gate.silu(hidden))
                    w.fc2.add(inner, hidden)
                runner.head(hidden[:, 0])

        out["weight_gemms_ms"] = timed_ms(gemms, repeats)

        def no_attention(index, query, key, value, mask, cache, start):
            return query.flatten(2)

        def no_attention_kernel(qkv, *args):
            return qkv[:, :, :-2].reshape(qkv.shape[0], -1)

        if runner.kernels:
            attention = replaced(decode_cpu, "decode_attention", no_attention_kernel)
            norm = replaced(decode_cpu, "rms_norm", lambda x, *a: x)
        else:
            attention = replaced(runner, "_attend", no_attention)
            norm = replaced(runner_mod.F, "rms_norm", lambda x, *a, **k: x)
        with attention:
            out["without_attention_ms"] = timed_ms(step, repeats)
        with norm:
            out["without_rmsnorm_ms"] = timed_ms(step, repeats)
    return out


def transformers_step(hf_dir: Path, dtype: str, tokens: torch.Tensor, repeats: int) -> dict[str, float]:
    from transformers import DynamicCache, LlamaForCausalLM
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    out: dict[str, float] = {}
    with torch.inference_mode():
        prefilled = model(tokens[:, :CACHED], use_cache=True).past_key_values
        layers = [(layer.keys.clone(), layer.values.clone()) for layer in prefilled.layers]

        def step() -> torch.Tensor:
            cache = DynamicCache()
            for i, (k, v) in enumerate(layers):  # a fresh 100-token cache (the append grows it)
                cache.update(k, v, i)
            return model(tokens[:, CACHED:], past_key_values=cache, use_cache=True).logits[:, -1]

        out["step_ms"] = timed_ms(step, repeats)
        logits = step().float()
        warpers = [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)]

        def sample() -> torch.Tensor:
            scores = logits
            for warp in warpers:
                scores = warp(tokens, scores)
            return torch.multinomial(scores.softmax(-1), 1)

        out["sampling_ms"] = timed_ms(sample, repeats)
    return out


def norm_cell(path: str, ours_row: dict[str, float]) -> str:
    """The kernel's RMSNorm costs ~5 us a call; replacing it by a no-op lets activations grow
    unnormalised through 30 layers, which slows the other ops more than the norm costs."""
    return "-" if path == PATHS["on"] else f"{ours_row['without_rmsnorm_ms']:.1f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Decode step anatomy: MegatronEngine vs transformers",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}, {report['threads']} torch threads; 1-minute load before/after: "
        f"{report['load_before']:.1f} / {report['load_after']:.1f}",
        f"- versions: torch {report['versions']['torch']}, transformers {report['versions']['transformers']}",
        f"- command: `{report['command']}`",
        f"- one decode step: {ROWS} rows x 1 new token after {CACHED} cached tokens, SmolLM2-135M; "
        "median ms of the repeats",
        "",
        "| dtype | ours: decode-step ops | ours: step | ours: weight GEMMs only | ours: rest of the step | without attention | "
        "without RMSNorm | ours: sampling | transformers: step | transformers: sampling "
        "| transformers / ours (step + sampling) | ceiling: transformers / (our weight GEMMs + sampling) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, row in report["dtypes"].items():
        h = row["transformers"]
        theirs = h["step_ms"] + h["sampling_ms"]
        for path, o in row["ours"].items():
            lines.append(
                f"| {dtype} | {path} | {o['full_step_ms']:.1f} | {o['weight_gemms_ms']:.1f} | "
                f"{o['full_step_ms'] - o['weight_gemms_ms']:.1f} | {o['without_attention_ms']:.1f} | "
                f"{norm_cell(path, o)} | {o['sampling_ms']:.1f} | "
                f"{h['step_ms']:.1f} | {h['sampling_ms']:.1f} | "
                f"{theirs / (o['full_step_ms'] + o['sampling_ms']):.2f}x | "
                f"{theirs / (o['weight_gemms_ms'] + o['sampling_ms']):.2f}x |")
    lines += [
        "",
        "A step includes the logits; sampling is T=0.7, top-p 0.9 on those logits (ours: top-p over the "
        "64 largest logits, widened when the nucleus is larger; transformers: its temperature and top-p "
        "warpers, which sort the whole vocabulary, and multinomial). The cached tokens are windows of "
        "the judge prompt, so the logits have the trained model's shape. "
        "'without X' replaces that part of our step by a no-op: the difference to the full step is what "
        "the part costs inside a real step, where it runs between the GEMMs (more than the same op "
        "timed alone). For the C++ kernels 'without RMSNorm' is left out: the kernel costs about 5 us "
        "a call (0.3 ms a step), and the no-op step was slower than the real one (unnormalised "
        "activations grow through 30 layers; the value is in the JSON). The ceiling column is the speedup an engine whose decode step were nothing but "
        "these weight GEMMs and our sampling would reach against transformers: the weights are read "
        "once per step in either engine, at the memory bandwidth of the machine.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="where to import the GGUF")
    args = parser.parse_args()

    import transformers

    from transformers import AutoTokenizer

    from benchmarks.generate_cpu import machine_info, prepare_hf_dir
    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.llama_map import load_hf_into_model
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, label = prepare_hf_dir(args.workdir or Path(tmp))
        cfg = load_config(REPO / "configs" / "smollm2_135m_cpu.yaml", ["precision.params_dtype=float32"])
        tokenizer = AutoTokenizer.from_pretrained(hf_dir) if label.startswith("SmolLM2") else None
        tokens = text_rows(tokenizer, cfg.model.vocab_size)
        rows: dict[str, Any] = {}
        with single_process_world():
            model = build_model(cfg)
            load_hf_into_model(model, hf_dir, cfg)
            model.eval()
            for dtype in args.dtypes.split(","):
                rows[dtype] = {
                    "ours": {PATHS[k]: ours(model, cfg, dtype, tokens, args.repeats, k) for k in PATHS},
                    "transformers": transformers_step(hf_dir, dtype, tokens, args.repeats)}
                print(dtype, json.dumps(rows[dtype]), flush=True)
    info = machine_info()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{info.get('cpu', platform.processor())}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "model": label,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": "python benchmarks/decode_anatomy.py " + " ".join(sys.argv[1:]),
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "rows": ROWS, "cached_tokens": CACHED, "dtypes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
