#!/usr/bin/env python3
"""Compute per-tensor / per-block weight entropy and write an EWQ quantization plan.

Writes quantized_models/quant_plan_<hash>.json and quantize_command_<hash>.sh (llama-quantize).
"""
from __future__ import annotations

from argparse import BooleanOptionalAction
from pathlib import Path

from ewq import assets
from ewq.cli import Parser, log, non_negative_float, non_negative_int, positive_int, run_main
from ewq.plan import Granularity, PlanParams
from ewq.planning import create_plan, write_plan


def parse_args(argv):
    parser = Parser(description=__doc__)
    parser.add_argument("--model", default=assets.default_model(), help="HF hub id or local model directory")
    parser.add_argument("--granularity", choices=[g.value for g in Granularity], default=Granularity.TENSOR.value,
                        help="decide per tensor or per transformer block (the plan records both levels)")
    parser.add_argument("--entropy-factor", type=non_negative_float, default=PlanParams.entropy_factor,
                        help="K: scores below mean - K*std are quantized to 4-bit")
    parser.add_argument("--fp16-factor", type=float, default=PlanParams.fp16_factor,
                        help="J: scores at or above mean + J*std stay fp16 (0 reproduces the seeds' rule)")
    parser.add_argument("--bins", type=positive_int, default=PlanParams.bins, help="histogram bins for the entropy")
    parser.add_argument("--keep-embeddings", action=BooleanOptionalAction, default=PlanParams.keep_embeddings,
                        help="keep token embeddings in fp16")
    parser.add_argument("--keep-lm-head", action=BooleanOptionalAction, default=PlanParams.keep_lm_head,
                        help="keep the output projection in fp16")
    parser.add_argument("--min-params", type=non_negative_int, default=PlanParams.min_params,
                        help="keep matrices with fewer parameters than this in fp16")
    parser.add_argument("--out-dir", type=Path, default=Path("quantized_models"), help="where the plan is written")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    params = PlanParams(granularity=Granularity(args.granularity), entropy_factor=args.entropy_factor,
                        fp16_factor=args.fp16_factor, bins=args.bins, keep_embeddings=args.keep_embeddings,
                        keep_lm_head=args.keep_lm_head, min_params=args.min_params)
    plan = create_plan(args.model, params)
    json_path, script = write_plan(plan, args.out_dir)
    summary = plan.summary()
    matrices = summary["matrices_by_precision"]
    log("plan: " + ", ".join(f"{p}: {c['tensors']} matrices" for p, c in matrices.items())
        + f"; blocks {summary['blocks_by_precision']}")
    log(f"estimated bits/weight: gguf {summary['estimated_bits_per_weight']['gguf']:.2f}, "
        f"bitsandbytes {summary['estimated_bits_per_weight']['bitsandbytes']:.2f}")
    print(json_path)
    print(script)


if __name__ == "__main__":
    run_main(main)
