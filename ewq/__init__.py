"""EWQ: entropy-guided mixed-precision quantization of Hugging Face causal LMs.

The folders follow the pipeline; each concern has one home:
  weights.py            safetensors I/O without building the model, model hash
  plan/                 the plan: vocabulary and entries, entropy, scores, decisions, building, plan files
  llamacpp/             llama.cpp: types, GGUF names, quantize script, tool build, GGUF files, in-process quantizers
  bitsandbytes_plan.py  applying a plan with bitsandbytes, reading the modules back
  backends/             evaluation engines behind one interface (Hugging Face, llama.cpp)
  metrics/              perplexity/KLD, MMLU, generation, BLEU/ROUGE, memory; Estimate and statistics
  data/                 offline evaluation data (Wikipedia text and roles, MMLU, prompts)
  bench/                one benchmark run: settings, inputs, stages, result
  results/              result files (layout and reader), atomic writes, checkpoints, environment
  report/               the comparison report and its figures
  sensitivity.py        the sensitivity study (does a score predict sensitivity?)
  commands/             the terminal scripts' entry points
  assets.py             the offline defaults and their preparation
  console.py, errors.py progress and log lines; the one-line user errors
"""

__version__ = "0.1.0"
