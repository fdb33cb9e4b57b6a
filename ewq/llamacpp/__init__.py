"""llama.cpp: tensor types, GGUF names, the quantize script, building the tools, GGUF files, in-process quantizers."""
