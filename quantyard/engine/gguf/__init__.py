"""GGUF output (llama.cpp's format). Heavy: imports numpy and gguf; load through the registry."""
