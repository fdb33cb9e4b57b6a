#!/usr/bin/env python3
"""Benchmark the Q4_K_M GGUF of the model through llama.cpp (built if missing), against the original."""
from functools import partial

from ewq.commands.bench_gguf import main
from ewq.commands.common import run_main
from ewq.results.record import Variant

if __name__ == "__main__":
    run_main(partial(main, variant=Variant.GGUF_Q4_K_M))
