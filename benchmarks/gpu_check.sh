#!/usr/bin/env bash
# The GPU check for the lent GPU machine (one H100 or H200, no network), in under 6 minutes:
# BF16 SFT and DPO step MFU of a ~1.1B Llama through our trainer, MegatronEngine decode tokens/s
# against the HBM bound, and the Triton log-prob kernel against torch (benchmarks/gpu_bench.py).
#
# megatron-core is not in that machine's image: its wheel travels in .gpu-wheels/ (made here by
# `python benchmarks/gpu_wheels.py prepare`, carried with the working tree) and is installed
# offline into a temporary folder put on PYTHONPATH; the image's torch is never touched. Each
# part runs in its own process under a timeout (its share of the time left), so a part that
# hangs still leaves the others' results. Writes <out-dir>/gpu_<gpu>.json and .md after every
# part and prints the table.
#
#   bash benchmarks/gpu_check.sh                              # on the GPU machine
#   bash benchmarks/gpu_check.sh --parts sft,dpo              # gpu_bench.py options pass through
#   bash benchmarks/gpu_check.sh --cpu-dry-run [--out-dir D]  # the same flow here: CPU, tiny model
#
# --cpu-dry-run   CPU, tiny model; the wheels are installed as pip would pick them for the GPU
#                 machine's Python 3.12 (proving the folder), the run uses this environment's
#                 megatron-core; results go to a new temp dir unless --out-dir is given
# --wheels DIR    the wheel folder (default .gpu-wheels)
# --out-dir DIR   where the JSON and markdown go (default benchmarks/results)
# --total-s S     seconds for everything, install included (default 345)
# Interpreter: $PYTHON if set, else /opt/torch/.venv/bin/python (the GPU image's), else
# .venv/bin/python in a dry run, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
dry=0 wheels=.gpu-wheels out_dir="" total_s=345
pass=()
while (($#)); do
  case "$1" in
    --cpu-dry-run) dry=1 ;;
    --wheels) wheels=$2; shift ;;
    --out-dir) out_dir=$2; shift ;;
    --total-s) total_s=$2; shift ;;
    *) pass+=("$1") ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x /opt/torch/.venv/bin/python ]; then py=/opt/torch/.venv/bin/python
elif [ -x /opt/torch/.venv/bin/python3 ]; then py=/opt/torch/.venv/bin/python3
elif ((dry)) && [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
echo "gpu_check: $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

work=()
if ((dry)); then
  device=cpu
  [ -n "$out_dir" ] || out_dir=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")
else
  device=cuda
  out_dir=${out_dir:-benchmarks/results}
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi finds none). Run it on the GPU machine;" \
         "to rehearse the whole flow on this CPU: bash benchmarks/gpu_check.sh --cpu-dry-run" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # The SFT and DPO parts each write a ~17 GB checkpoint (then delete it): RAM is faster than disk.
  shm_free_gib=$(df -P -BG /dev/shm 2>/dev/null | awk 'NR == 2 {print $4 + 0}')
  if [ "${shm_free_gib:-0}" -ge 40 ]; then work=(--work-dir /dev/shm); fi
fi

site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
pkg=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_pkg.XXXXXX")
trap 'rm -rf "$site" "$pkg"' EXIT
# Our package as an install lays it out (setup.py: kernels/ is megatron_selfreward.kernels),
# copied from this tree: nothing is built or installed on the GPU machine.
cp -r megatron_selfreward "$pkg/megatron_selfreward"
cp -r kernels "$pkg/megatron_selfreward/kernels"
"$py" benchmarks/gpu_wheels.py verify --dest "$wheels"
if ((dry)); then
  "$py" benchmarks/gpu_wheels.py install --dest "$wheels" --target "$site" --for-target-python
  export PYTHONPATH="$pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  "$py" benchmarks/gpu_wheels.py install --dest "$wheels" --target "$site"
  export PYTHONPATH="$site:$pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

# Fail in seconds, naming what is missing, rather than in every part.
# -P: not the working directory first (its megatron_selfreward has no kernels/ inside)
"$py" -P - "$device" "$site" "$pkg" <<'PY'
import importlib.metadata
import sys

device, site, pkg = sys.argv[1], sys.argv[2], sys.argv[3]
import torch

missing = []
if device == "cuda" and not torch.cuda.is_available():
    missing.append("a CUDA build of torch that sees the GPU")
modules = ["megatron.core", "megatron_selfreward.train", "megatron_selfreward.generation.megatron_engine",
           "megatron_selfreward.kernels.logprobs"] + (["triton"] if device == "cuda" else [])
for module in modules:
    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{module} ({type(err).__name__}: {err})")
if missing:
    sys.exit("gpu_check.sh: missing " + "; ".join(missing))
import megatron.core

import megatron_selfreward

if not megatron_selfreward.__file__.startswith(pkg):
    sys.exit(f"gpu_check.sh: megatron_selfreward comes from {megatron_selfreward.__file__}, not {pkg}")
origin = megatron.core.__file__
if device == "cuda" and not origin.startswith(site):
    sys.exit(f"gpu_check.sh: megatron.core comes from {origin}, not the carried wheel in {site}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core "
      f"{importlib.metadata.version('megatron-core')} from {origin}"
      + (f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ", CPU dry run"))
PY

budget_s=$((total_s - (SECONDS - started) - 10))
echo "gpu_check: ${budget_s} s left for the parts; results in $out_dir"
set +e
# gpu_bench.py keeps to the budget itself; this timeout is the backstop (results so far stay).
timeout -k 10 $((budget_s + 10)) "$py" benchmarks/gpu_bench.py --device "$device" --isolate \
  --time-budget-s "$budget_s" --out-dir "$out_dir" ${work[@]+"${work[@]}"} ${pass[@]+"${pass[@]}"}
rc=$?
set -e
echo "gpu_check: exit $rc after $((SECONDS - started)) s; results in $out_dir"
exit $rc
