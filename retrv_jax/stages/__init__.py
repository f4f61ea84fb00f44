"""The training stages of Retrv-R1 (pretrain for the tiny model, align, sft, grpo)."""
