"""The terminal scripts' entry points, one module each; the top-level scripts only call them.

    common      parser, error wrapper, argument types, shared arguments, default directories
    plan        create_quantization_plan.py
    bench_hf    benchmark_original.py, benchmark_ewq.py (Hugging Face; bitsandbytes)
    bench_gguf  benchmark_gguf_{q4,q8,ewq}.py (llama.cpp); `python -m ewq.commands.bench_gguf F16` too
    report      compare_results.py
    study       study_sensitivity.py
    setup       the set-up steps of scripts/setup.sh (the offline assets, llama.cpp's tools)
"""
