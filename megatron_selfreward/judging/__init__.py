"""LLM-as-a-Judge: the paper's prompt, score parsing, preference pairs, reward-model metrics."""
