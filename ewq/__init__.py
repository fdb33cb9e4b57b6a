"""EWQ: entropy-guided mixed-precision quantization of Hugging Face causal LMs.

The folders follow the pipeline; each concern has one home. Floors, lowest first (a module imports
only from its floor or below; tests/test_layout.py checks it and draws the picture):
  ground      quant_types.py (every GGUF / bitsandbytes type, ladder and menu), fileio.py (atomic
              writes, writable directories, digests), processes.py (running a tool), console.py, errors.py
  files       weights.py (safetensors I/O, model hash), assets.py (offline defaults), data/ (evaluation
              text, MMLU, prompts), results/ (the result record, Estimate, checkpoints, environment),
              llamacpp/ (tool build, GGUF names, in-process quantizers, quantize script, GGUF read-back,
              the tools at work), experts.py (MoE stacks, a plan entry's values in a loaded model),
              rearranged.py (matrices the converter rearranges)
  engines     backends/ (Hugging Face, llama.cpp behind one interface), metrics/ (perplexity, the one KLD,
              MMLU, generation, BLEU/ROUGE, memory, statistics)
  measure and decide
              sensitivity/ (the measuring service: swap, measure, restore, cache), plan/ (entries, scores,
              the threshold rule, one allocator over a menu, plan files)
  apply and run
              bnb_model.py (a plan through bitsandbytes, read back), bench/ (one benchmark run)
  compare     study.py (does a score predict sensitivity?), report/ (the comparison page and figures)
  commands    commands/ (the terminal scripts' entry points, set-up included)
"""

__version__ = "0.1.0"
