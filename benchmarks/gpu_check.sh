#!/usr/bin/env bash
# One prepared GPU benchmark run (< 10 minutes on one H200): training-step MFU of a ~1.1B Llama
# through our trainer, MegatronEngine tokens/s at batch 1 and 64 against the HBM bound, and the
# Triton log-prob kernel against the torch reference. Needs torch (CUDA) + triton + megatron-core
# (no Transformer Engine). Writes benchmarks/results/gpu_<device>.json and .md, prints the table.
#
#   bash benchmarks/gpu_h200.sh                  # the whole benchmark
#   bash benchmarks/gpu_h200.sh --parts logprobs # one part; any gpu_bench.py option passes through
#   PYTHON=/path/to/python bash benchmarks/gpu_h200.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_h200.sh: no NVIDIA GPU here (nvidia-smi finds none). Run it on the GPU machine;" \
       "for a CPU smoke test: $PYTHON benchmarks/gpu_bench.py --device cpu --out /tmp/gpu_bench.json" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'PY'
import sys
import torch
missing = []
if not torch.cuda.is_available():
    missing.append("a CUDA build of torch that sees the GPU")
for module in ("triton", "megatron.core"):
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{module} ({type(err).__name__}: {err})")
if missing:
    sys.exit("gpu_h200.sh: missing " + "; ".join(missing))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
# 570 s: the benchmark must finish inside a 10-minute slot even if a part hangs.
exec timeout 570 "$PYTHON" benchmarks/gpu_bench.py --device cuda --bandwidth-tb-s 4.8 "$@"
