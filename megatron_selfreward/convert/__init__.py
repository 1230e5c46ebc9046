"""Checkpoint conversion: GGUF -> HF, HF <-> Megatron distributed checkpoints, TensorRT-LLM export."""
