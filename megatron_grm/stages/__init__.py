"""The method's stages — sft (RFT's training half), rft, grpo, metarm, evaluate — each a Hydra entry point."""
