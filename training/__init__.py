"""Training for MMR1: the dataset format, SFT and GRPO."""
