"""Training support: what the HF Trainer reads off a model (signature, state dict), gradient checkpointing."""
