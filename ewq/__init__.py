"""EWQ: entropy-guided mixed-precision quantization of Hugging Face causal LMs.

Modules, one idea each:
  weights    safetensors I/O without building the model, model hash
  entropy    Shannon entropy and shape statistics of one tensor
  plan       the quantization plan: data model, decision rule, JSON I/O
  llamacpp   GGUF tensor names, ggml types, the llama-quantize command
  bnb        applying a plan with bitsandbytes and reading it back
  data       offline evaluation data (Wikipedia text, MMLU, prompts)
  backends   evaluation engines behind one interface (Hugging Face, ...)
  metrics    perplexity/KLD, MMLU, generation speed, BLEU/ROUGE, memory
  results    result JSON, environment capture, atomic writes
  benchmark  runs every metric on one backend and writes the result
"""

__version__ = "0.1.0"
