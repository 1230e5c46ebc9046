"""Throughput accounting for a run: the peak FLOP/s an MFU divides by, training MFU per stage,
generation figures derived from the engine counters, and the run's peak memory.

Conventions (stated again in every throughput.json under "conventions"):

- Training FLOPs per token: `perf/flops.py::training_flops_per_token` (Megatron-LM's formula:
  forward + backward GEMMs, no recomputation, no elementwise work) with the causal half of the
  attention scores counted only (`CAUSAL_HALVED = True`, Megatron-LM's current convention).
- Its sequence length is the mean real (non-pad) tokens per sequence of the run: tokens over
  steps x sequences per step (global batch; x2 for DPO: chosen and rejected are sequences of
  their own). Capped at the configured `seq_len`. With `sft.packing` the packed `seq_len` is used.
- Tokens are real tokens (what `metrics.jsonl` counts); padding is not model work. The time is
  the optimizer steps' time (`step_time_s`); DPO's one-off reference forward is outside it.
- Peak: on CUDA the vendor's dense BF16 figure for the device (`PEAK_BF16_FLOPS`) times the
  training processes (`executor.nproc_per_node`); on CPU the best-of matmul rate measured on this
  machine in the training dtype with torch's thread count (`measure_matmul_flops`), once per run
  directory (cached in `report/peak_flops.json`, reused while host, device and dtype match).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_selfreward.config import Config
from megatron_selfreward.perf.flops import (
    PEAK_BF16_FLOPS,
    LlamaShape,
    measure_matmul_flops,
    mfu,
    peak_key_for_device_name,
    training_flops_per_token,
)
from megatron_selfreward.perf.memory import process_peaks

__all__ = ["CAUSAL_HALVED", "PEAK_CACHE_FILE", "Peak", "cached_peak", "conventions", "device_peak",
           "generation_accounting", "run_memory", "training_accounting"]

CAUSAL_HALVED = True
PEAK_CACHE_FILE = "peak_flops.json"
# CPU peak measurement: large enough to reach the GEMM roofline on a laptop-class CPU, small
# enough to take well under a second per repeat.
CPU_MATMUL_N = 1024
CPU_MATMUL_REPEATS = 5
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Peak:
    """The FLOP/s of one device that MFU divides by, and where the number came from."""

    device: str  # "cpu" or the CUDA device name
    flop_s_per_device: float
    dtype: str
    source: str
    host: str
    threads: int
    measured_at: str

    def matches(self, other: Peak) -> bool:
        return (self.device, self.dtype, self.host) == (other.device, other.dtype, other.host)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def device_peak(dtype: str = "bfloat16", *,
                measure: Callable[..., float] = measure_matmul_flops) -> Peak:
    """This machine's peak: the datasheet figure of the CUDA device, or a measured CPU matmul."""
    host = socket.gethostname()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        key = peak_key_for_device_name(name)
        if key is None:
            raise KeyError(f"no dense BF16 peak known for CUDA device {name!r}; add it to "
                           "PEAK_BF16_FLOPS in megatron_selfreward/perf/flops.py")
        value = PEAK_BF16_FLOPS[key]
        assert value is not None
        return Peak(name, value, "bfloat16", f"datasheet dense BF16 ({key})", host,
                    torch.get_num_threads(), _now())
    torch_dtype = _DTYPES.get(dtype, torch.float32)
    value = measure(n=CPU_MATMUL_N, dtype=torch_dtype, repeats=CPU_MATMUL_REPEATS)
    cpu = platform.processor() or platform.machine()
    return Peak("cpu", value, dtype,
                f"measured: best of {CPU_MATMUL_REPEATS} {CPU_MATMUL_N}^3 {dtype} matmuls "
                f"({torch.get_num_threads()} threads, {cpu})", host, torch.get_num_threads(), _now())


def cached_peak(cache: Path, dtype: str = "bfloat16", *,
                measure: Callable[..., float] = measure_matmul_flops) -> Peak:
    """`device_peak`, measured once: reused from `cache` while host, device and dtype match."""
    cache = Path(cache)
    want_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    want_dtype = "bfloat16" if torch.cuda.is_available() else dtype
    try:
        saved = Peak(**json.loads(cache.read_text(encoding="utf-8")))
        if (saved.device, saved.dtype, saved.host) == (want_device, want_dtype, socket.gethostname()):
            return saved
    except (OSError, ValueError, TypeError):
        pass  # absent, unreadable or another schema: measure again
    peak = device_peak(dtype, measure=measure)
    from megatron_selfreward.io import atomic_write_json

    atomic_write_json(cache, asdict(peak))
    return peak


def conventions() -> dict[str, Any]:
    return {
        "training_flops": "megatron_selfreward/perf/flops.py training_flops_per_token "
                          "(Megatron-LM formula: fwd + bwd GEMMs, 6N + attention)",
        "causal_attention_halved": CAUSAL_HALVED,
        "attention_seq_len": "mean real tokens per sequence (tokens / (steps x sequences per "
                             "step)), capped at the configured seq_len",
        "tokens": "real (non-pad) tokens; time: optimizer steps only",
        "mfu_denominator": "CUDA: datasheet dense BF16 peak x training processes; CPU: measured "
                           "matmul peak of this machine in the training dtype",
        "prefill_tokens": "tokens actually computed (a prompt shared by n samples counts once)",
    }


def _phase(label: str) -> str:
    return "dpo" if label.upper().startswith("DPO") else "sft"


def training_accounting(train_rows: list[dict[str, Any]], cfg: Config | None,
                        peak: Peak | None) -> list[dict[str, Any]]:
    """`report.collect.training_throughput` rows plus FLOPs per token, model FLOP/s and MFU."""
    out = []
    for row in train_rows:
        row = dict(row)
        out.append(row)
        if cfg is None:
            row["mfu_missing"] = "no config.yaml: model shape unknown"
            continue
        phase = _phase(str(row.get("run", "")))
        opt = cfg.dpo if phase == "dpo" else cfg.sft
        sequences = opt.global_batch_size * (2 if phase == "dpo" else 1)
        steps, tokens = row.get("steps") or 0, row.get("tokens") or 0.0
        if getattr(opt, "packing", False):
            seq_len = float(opt.seq_len)
        else:
            seq_len = min(tokens / (steps * sequences), float(opt.seq_len)) if steps else float(opt.seq_len)
        per_token = training_flops_per_token(LlamaShape.from_config(cfg), seq_len,  # type: ignore[arg-type]
                                             causal_halved=CAUSAL_HALVED)
        tokens_per_s = row.get("tokens_per_s")
        row.update({"phase": phase, "attention_seq_len": seq_len, "flops_per_token": per_token,
                    "model_flop_s": tokens_per_s * per_token if tokens_per_s else None,
                    "causal_attention_halved": CAUSAL_HALVED})
        if peak is None:
            row["mfu_missing"] = "no peak FLOP/s"
            continue
        devices = cfg.executor.nproc_per_node if peak.device != "cpu" else 1
        row["peak_flop_s"] = peak.flop_s_per_device * devices
        row["peak_devices"] = devices
        row["mfu"] = mfu(tokens_per_s, per_token, row["peak_flop_s"]) if tokens_per_s else None
    return out


def _ratio(num: Any, den: Any) -> float | None:
    return num / den if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den else None


def generation_accounting(gen_rows: list[dict[str, Any]],
                          engines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Generation rows plus what the engine counters imply.

    `engines` maps a row's stage label to its manifest's raw engine statistics. Derived: the mean
    number of rows per decode step (`decode_row_steps / decode_steps`: how full the batches
    stayed as samples finished), the fraction of computed prefill columns that were padding, the
    prefill work saved by sharing prompts among samples, output tokens per engine second
    (prefill + decode) and per stage second (tokenising, judging prompts, file writes included).
    """
    out = []
    for row in gen_rows:
        row = dict(row)
        e = engines.get(row["stage"], {})
        computed, pad = e.get("prefill_tokens_computed"), e.get("prefill_pad_tokens")
        engine_s = (e.get("prefill_time_s") or 0.0) + (e.get("decode_time_s") or 0.0)
        row.update({
            "decode_mean_batch": _ratio(e.get("decode_row_steps"), e.get("decode_steps")),
            "prefill_pad_fraction": _ratio(pad, (computed or 0) + (pad or 0)) if computed is not None else None,
            "prefill_saved_fraction": e.get("prefill_saved_fraction"),
            "engine_time_s": engine_s or None,
            "output_tokens_per_engine_s": _ratio(e.get("decode_tokens"), engine_s),
            "output_tokens_per_stage_s": _ratio(e.get("decode_tokens"), row.get("wall_time_s")),
        })
        out.append(row)
    return out


def _launched_as_run() -> bool:
    """True in the process of `selfreward run` (the local executor runs every stage in it)."""
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return bool(args) and args[0] == "run" and Path(sys.argv[0]).name in ("selfreward", "cli.py", "__main__.py")


def run_memory() -> dict[str, Any]:
    """Peak memory of the process writing the report, and what it covers.

    Written from inside `selfreward run` (the report is its last stage) this is the whole run's
    peak: every in-process stage, plus the largest torchrun child. From anywhere else (`selfreward
    report`, a Slurm job per stage) it is that process's alone, and says so.
    """
    peaks = process_peaks()
    if _launched_as_run():
        scope = ("selfreward run: every stage this process ran since it started (stages finished "
                 "by an earlier process are not covered); children: the largest torchrun stage")
    else:
        scope = f"this process only ({' '.join(Path(a).name for a in sys.argv[:2])}); not the run's stages"
    return {**peaks, "covers_run": _launched_as_run(), "scope": scope, "pid": os.getpid()}
