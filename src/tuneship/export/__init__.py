"""Export: merge the adapter, convert to GGUF with llama.cpp's own converter, quantize, validate."""
