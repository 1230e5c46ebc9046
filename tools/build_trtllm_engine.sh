#!/usr/bin/env bash
# Prepare a model for TensorRT-LLM generation (GPU cluster, TensorRT-LLM >= 1.0 installed).
#
# With the default generation.trtllm_backend=pytorch there is no engine to build: TensorRT-LLM's
# PyTorch backend loads the bf16 Hugging Face export directly, and this only writes that export.
# generation.trtllm_backend=tensorrt (TensorRT-LLM's legacy TensorRT-engine backend, absent from
# releases that removed it) builds an engine as well.
#
# UNVERIFIED: TensorRT-LLM cannot be installed where this project is developed and tested; the
# export step (Megatron -> bf16 Hugging Face directory) and the command construction are tested,
# the TensorRT-LLM calls against a stand-in for its LLM API (tests/unit/test_trtllm_engine.py,
# which runs against the real module on a GPU machine). Everything is decided in
# megatron_selfreward/generation/trtllm_build.py; this file only forwards arguments so that Slurm
# scripts have one command to call.
#
# Usage, a run's model directory (what generation.engine=trtllm does on first use, e.g. as a
# Slurm job before the sampling/judging jobs of an iteration; a current export/engine is reused):
#   tools/build_trtllm_engine.sh --config configs/llama2_70b.yaml --model-dir runs/x/models/M1 \
#       [--overwrite] [generation.trtllm_backend=tensorrt] [overrides...]
#   -> runs/x/models/M1/hf (bf16 export of megatron/, if that is where the weights are) and, with
#      the TensorRT backend, runs/x/models/M1/trtllm (the engine, stamped with its build spec and
#      source weights)
#
# Usage, any checkpoint into chosen directories (TensorRT backend; not stamped: the pipeline does
# not reuse them):
#   tools/build_trtllm_engine.sh --config configs/llama2_70b.yaml --ckpt runs/x/models/M1/megatron \
#       --hf-out /scratch/M1_hf --engine-out /scratch/M1_engine \
#       [--method llm-api|trtllm-build|export-only] \
#       [--convert-script $TRTLLM/examples/models/core/llama/convert_checkpoint.py] [overrides...]
#
# --method llm-api (default): TensorRT-LLM's LLM API (tensorrt_llm._tensorrt_engine) builds from
#   the HF directory and saves the engine; --method trtllm-build: convert_checkpoint.py then
#   trtllm-build, with the config's TP/PP, max_batch_size (generation.batch_size), max_input_len
#   and max_seq_len; --method export-only: the HF directory alone (all the PyTorch backend needs).
set -euo pipefail
exec python -m megatron_selfreward.generation.trtllm_build "$@"
