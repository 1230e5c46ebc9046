#!/usr/bin/env bash
# Build a TensorRT-LLM engine from a Megatron checkpoint (GPU cluster, TensorRT-LLM installed).
#
# UNVERIFIED: TensorRT-LLM cannot be installed where this project is developed and tested; only
# the export step (Megatron -> bf16 Hugging Face directory) and the command construction are
# tested. Everything is decided in megatron_selfreward/convert/trtllm_export.py; this file only
# forwards arguments so that Slurm scripts have one command to call.
#
# Usage:
#   tools/build_trtllm_engine.sh --config configs/llama2_70b.yaml --ckpt runs/x/models/M1 \
#       --hf-out runs/x/models/M1/hf --engine-out runs/x/models/M1/trtllm \
#       [--method llm-api|trtllm-build|export-only] \
#       [--convert-script $TRTLLM/examples/models/core/llama/convert_checkpoint.py] [overrides...]
#
# --method llm-api (default): TensorRT-LLM's LLM API builds from the HF directory and saves
#   the engine; --method trtllm-build: convert_checkpoint.py then trtllm-build, with the
#   config's TP/PP, max_batch_size (generation.batch_size), max_input_len and max_seq_len.
set -euo pipefail
exec python -m megatron_selfreward.convert.trtllm_export "$@"
