"""Peak memory of checkpoint conversion against checkpoint size.

Builds a synthetic Hugging Face Llama checkpoint (random bf16 weights, TinyLlama-1.1B widths,
enough layers for >= 1 GB, written tensor by tensor into 400 MB shards with an index), then runs
each conversion in its own child process and reads that child's peak resident memory (VmHWM
in /proc/self/status, reported by the child at exit) and its resident memory just before
converting (imports done: the fixed overhead). Not `ru_maxrss`: Linux carries it over from the
forked parent across exec, so a child would report the parent's peak. The round trip is checked
bit-exact, tensor by tensor. The claim under test: peak RSS < 0.5 x checkpoint size + overhead.

    python benchmarks/convert_memory.py [--layers 10 20] [--workdir /tmp/convert_memory]

Writes benchmarks/results/convert_memory.json and .md (dated, with hardware and command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "convert_memory.json"
RESULTS_MD = RESULTS.with_suffix(".md")
# TinyLlama-1.1B's widths (GQA 32 heads / 4 KV heads); the layer count sets the size.
WIDTHS = ["model.hidden_size=2048", "model.ffn_hidden_size=5632", "model.num_attention_heads=32",
          "model.num_query_groups=4", "model.vocab_size=32000", "model.max_seq_len=2048"]


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: this process image's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def make_checkpoint(out: Path, layers: int) -> int:
    """Random bf16 HF Llama, each tensor generated only when the writer reaches it."""
    import torch

    from megatron_selfreward.config import load_config
    from megatron_selfreward.convert.hf_checkpoint import write_hf_weights
    from megatron_selfreward.convert.llama_map import hf_config_from_model, hf_tensor_shapes

    cfg = load_config(None, WIDTHS + [f"model.num_layers={layers}"])
    shapes = hf_tensor_shapes(cfg)
    gen = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        return (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)

    out.mkdir(parents=True)
    items = [(n, s, torch.bfloat16) for n, s in shapes.items()]
    write_hf_weights(out, items, produce, max_shard_bytes=400 * 1024**2)
    (out / "config.json").write_text(json.dumps(hf_config_from_model(cfg, "bfloat16"), indent=2))
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def child(direction: str, src: Path, dst: Path) -> None:
    """Runs in a fresh process: one conversion; prints its memory figures as JSON."""
    from megatron_selfreward.convert.hf_megatron import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_selfreward.megatron.parallel import single_process_world

    with single_process_world():  # start-up cost of the world counted as overhead, not work
        baseline = _status_bytes("VmRSS")
        start = time.perf_counter()
        if direction == "hf_to_megatron":
            convert_hf_to_megatron(src, dst)
        else:
            convert_megatron_to_hf(src, dst)
        seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "seconds": seconds}))


def run_child(direction: str, src: Path, dst: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", direction, str(src), str(dst)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_round_trip(a: Path, b: Path) -> int:
    """Every tensor equal bit for bit, read one at a time; returns how many were compared."""
    import torch

    from megatron_selfreward.convert.hf_checkpoint import HFWeights

    left, right = HFWeights(a), HFWeights(b)
    if left.specs.keys() != right.specs.keys():
        raise AssertionError("round trip changed the set of tensors")
    for name in left.specs:
        if not torch.equal(left.get(name), right.get(name)):
            raise AssertionError(f"round trip changed {name}")
    return len(left.specs)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def environment() -> dict:
    import megatron.core
    import psutil
    import torch

    return {
        "date": datetime.date.today().isoformat(), "python": platform.python_version(),
        "torch": torch.__version__, "megatron_core": megatron.core.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "command": "python benchmarks/convert_memory.py " + " ".join(sys.argv[1:]),
    }


def table(rows: list[dict]) -> str:
    lines = ["| direction | layers | checkpoint GB | largest tensor MB | wall s | overhead MB "
             "| peak RSS MB | peak - overhead MB | (peak - overhead) / size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        working = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
        lines.append(f"| {r['direction']} | {r['layers']} | {r['checkpoint_bytes'] / 1e9:.2f} | "
                     f"{r['largest_tensor_bytes'] / 1e6:.0f} | "
                     f"{r['seconds']:.1f} | {r['baseline_rss_bytes'] / 1e6:.0f} | "
                     f"{r['peak_rss_bytes'] / 1e6:.0f} | {working / 1e6:.0f} | {r['working_over_size']:.3f} |")
    return "\n".join(lines)


def measure(workdir: Path, layers: int) -> dict:
    """Make one synthetic checkpoint, convert it both ways in child processes, check it."""
    shutil.rmtree(workdir, ignore_errors=True)
    hf, megatron_dir, back = workdir / "hf", workdir / "megatron", workdir / "hf_back"
    size = make_checkpoint(hf, layers)
    from megatron_selfreward.convert.hf_checkpoint import HFWeights

    largest = max(spec.end - spec.begin for spec in HFWeights(hf).specs.values())
    rows = []
    for direction, src, dst in (("hf_to_megatron", hf, megatron_dir), ("megatron_to_hf", megatron_dir, back)):
        result = run_child(direction, src, dst)
        rows.append({"direction": direction, "layers": layers, "checkpoint_bytes": size,
                     "largest_tensor_bytes": largest,
                     "output_bytes": dir_bytes(dst), **result,
                     "peak_over_size": result["peak_rss_bytes"] / size,
                     "working_over_size": (result["peak_rss_bytes"] - result["baseline_rss_bytes"]) / size})
    return {"rows": rows, "round_trip_bit_exact_tensors": check_round_trip(hf, back)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 20],
                        help="one checkpoint per value (10 layers = 1.14 GB, 20 = 2.03 GB in bf16)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert_memory"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    runs = [measure(args.workdir / f"layers{n}", n) for n in args.layers]
    rows = [row for run in runs for row in run["rows"]]
    report = {"environment": environment(), "widths": WIDTHS, "dtype": "bfloat16",
              "round_trip_bit_exact_tensors": [run["round_trip_bit_exact_tensors"] for run in runs],
              "results": rows, "target": "peak RSS < 0.5 x checkpoint size + fixed overhead"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    env = report["environment"]
    RESULTS_MD.write_text(
        f"# Checkpoint conversion memory ({env['date']})\n\n`{env['command']}`\n\n"
        f"{env['cpu_count']} CPUs, {env['memory_gib']} GiB, Python {env['python']}, torch {env['torch']}, "
        f"megatron-core {env['megatron_core']}. Synthetic bf16 Llama ({', '.join(WIDTHS)}); "
        f"overhead = resident memory after imports, before converting; round trips bit-exact.\n\n"
        f"{table(rows)}\n")
    print(table(rows))
    print(f"round trips bit-exact; wrote {RESULTS.relative_to(REPO)}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
