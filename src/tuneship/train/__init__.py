"""Training: device + memory, the LoRA/QLoRA model, the guarded trainer and its callbacks."""
