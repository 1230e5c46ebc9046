"""Generation engines behind one protocol: the in-process Megatron KV-cache engine, TensorRT-LLM."""
