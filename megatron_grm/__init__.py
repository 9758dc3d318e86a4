"""megatron-grm: generative reward models trained with SPCT on Megatron-Core."""
