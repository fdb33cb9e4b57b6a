#!/usr/bin/env python3
"""Benchmark the original model: speed, memory, perplexity, MMLU, BLEU/ROUGE; stores KLD reference log-probs."""
from ewq.commands.common import run_main
from ewq.commands.bench_hf import original_main

if __name__ == "__main__":
    run_main(original_main)
