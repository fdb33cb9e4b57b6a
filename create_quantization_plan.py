#!/usr/bin/env python3
"""Compute per-tensor / per-block weight entropy and write an EWQ quantization plan.

Writes quantized_models/quant_plan_<hash>.json, quantize_command_<hash>.sh and the tensor_types_<hash>.txt it
passes to llama-quantize --tensor-type-file.
"""
from ewq.commands.common import run_main
from ewq.commands.plan import main

if __name__ == "__main__":
    run_main(main)
