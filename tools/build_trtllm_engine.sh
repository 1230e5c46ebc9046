#!/usr/bin/env bash
# Build a TensorRT-LLM engine from a Megatron checkpoint (GPU cluster, TensorRT-LLM installed).
#
# UNVERIFIED: TensorRT-LLM cannot be installed where this project is developed and tested; the
# export step (Megatron -> bf16 Hugging Face directory) and the command construction are tested,
# the build-once/reuse logic only against a stand-in for TensorRT-LLM's LLM API. Everything is
# decided in megatron_selfreward/convert/trtllm_export.py; this file only forwards arguments so
# that Slurm scripts have one command to call.
#
# Usage, a run's model directory (what generation.engine=trtllm does on first use, e.g. as a
# Slurm job before the sampling/judging jobs of an iteration; a current engine is reused):
#   tools/build_trtllm_engine.sh --config configs/llama2_70b.yaml --model-dir runs/x/models/M1 \
#       [--overwrite] [overrides...]
#   -> runs/x/models/M1/hf (bf16 export of megatron/, if that is where the weights are) and
#      runs/x/models/M1/trtllm (the engine, stamped with its build spec and source weights)
#
# Usage, any checkpoint into chosen directories (not stamped: the pipeline does not reuse them):
#   tools/build_trtllm_engine.sh --config configs/llama2_70b.yaml --ckpt runs/x/models/M1/megatron \
#       --hf-out /scratch/M1_hf --engine-out /scratch/M1_engine \
#       [--method llm-api|trtllm-build|export-only] \
#       [--convert-script $TRTLLM/examples/models/core/llama/convert_checkpoint.py] [overrides...]
#
# --method llm-api (default): TensorRT-LLM's LLM API builds from the HF directory and saves
#   the engine; --method trtllm-build: convert_checkpoint.py then trtllm-build, with the
#   config's TP/PP, max_batch_size (generation.batch_size), max_input_len and max_seq_len.
set -euo pipefail
exec python -m megatron_selfreward.convert.trtllm_export "$@"
