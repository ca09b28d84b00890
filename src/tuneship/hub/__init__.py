"""The Hugging Face hub: search GGUF repos, pull the right quant (verified), push a run."""
