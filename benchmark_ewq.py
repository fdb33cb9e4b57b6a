#!/usr/bin/env python3
"""Benchmark the model with the EWQ plan applied through bitsandbytes, against the original."""
from ewq.commands.common import run_main
from ewq.commands.bench_hf import ewq_main

if __name__ == "__main__":
    run_main(ewq_main)
