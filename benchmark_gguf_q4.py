#!/usr/bin/env python3
"""Benchmark the Q4_K_M GGUF of the model through llama.cpp (built if missing), against the original."""
from functools import partial

from ewq.cli import run_main
from ewq.gguf_runs import main

if __name__ == "__main__":
    run_main(partial(main, kind="Q4_K_M"))
