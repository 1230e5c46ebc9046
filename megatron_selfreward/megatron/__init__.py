"""Everything that touches megatron.core: model builder, parallel init, training step, checkpoints, CPU compatibility."""
