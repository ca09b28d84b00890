"""Deploy: Modelfile and Ollama template, Ollama REST client, LM Studio and llama.cpp targets."""
