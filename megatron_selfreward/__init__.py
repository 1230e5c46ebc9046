"""megatron-selfreward: Self-Rewarding Language Models (Yuan et al. 2024) on Megatron-Core."""

__version__ = "0.1.0"
