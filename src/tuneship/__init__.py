"""tuneship: fine-tune an open LLM on your examples and ship a model that answers and stops."""

__version__ = "0.1.0"
