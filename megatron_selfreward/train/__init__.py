"""SFT and DPO training on megatron.core: `run_sft`, `run_dpo` and the loop they share."""

from megatron_selfreward.train.dpo import prepare_dpo_data, run_dpo
from megatron_selfreward.train.sft import run_sft

__all__ = ["prepare_dpo_data", "run_dpo", "run_sft"]
