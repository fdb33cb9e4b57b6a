"""create_quantization_plan.py: score every tensor and write quant_plan_<hash>.json and quantize_command_<hash>.sh."""
from __future__ import annotations

import collections
from argparse import BooleanOptionalAction
from pathlib import Path

import torch

from .. import weights
from ..backends import hf
from ..console import log
from ..errors import UserError
from ..llamacpp.gguf_read import describe
from ..llamacpp.quantizers import ImportanceMatrix
from ..quant_types import Arithmetic
from ..plan.create import create_plan
from ..plan.files import plan_path, script_path, types_path, write_plan
from ..plan.entries import Allocator, Granularity, Plan, PlanParams, Score, plan_hash
from ..fileio import check_writable_dir, file_digest
from .common import (DEVICE_MAPS, DEVICES, PLANS_DIR, Parser, add_dry_run_arg, add_model_arg, dry_run, non_negative_float, non_negative_int,
                     positive_float, positive_int)

DESCRIPTION = """Compute per-tensor / per-block weight entropy and write an EWQ quantization plan.

Writes quantized_models/quant_plan_<hash>.json, quantize_command_<hash>.sh and the tensor_types_<hash>.txt it
passes to llama-quantize --tensor-type-file.
"""
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6, "MIB": 2**20,
          "G": 2**30, "GB": 10**9, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'98.9MiB', '104MB', '103668480' -> bytes; or the path of a GGUF file -> its tensor bytes."""
    if Path(text).suffix == ".gguf":
        return int(describe(Path(text)).weight_bytes)
    number = text.strip().upper().rstrip()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if unit and number.endswith(unit):
            value, factor = number[: -len(unit)], _UNITS[unit]
            break
    else:
        value, factor = number, 1
    try:
        size = float(value) * factor
    except ValueError:
        raise UserError(f"--target-size takes bytes with an optional unit (e.g. 98.9MiB) or a .gguf file, "
                        f"got {text!r}") from None
    if size <= 0:
        raise UserError(f"--target-size must be positive, got {text!r}")
    return int(size)


def parse_args(argv):
    parser = Parser(description=DESCRIPTION)
    add_model_arg(parser)
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
    budget = parser.add_argument_group("size-budget plans (instead of the thresholds)")
    target = budget.add_mutually_exclusive_group()
    target.add_argument("--target-bpw", type=positive_float, help="bits per weight over all tensors, as read back")
    target.add_argument("--target-size", help="tensor bytes (e.g. 98.9MiB, 104MB) or a .gguf file to match in size")
    budget.add_argument("--score", choices=[s.value for s in Score], default=Score.ENTROPY.value,
                        help="rank matrices by entropy (EWQ), measured 4-bit error, or at random (control); "
                             "pr15550: the error weighted as llama.cpp PR #15550's --target-bpw weighs it (rows x a "
                             "boost per tensor kind); or kld: minimise the predicted KLD from measured sensitivities")
    budget.add_argument("--allocator", choices=[a.value for a in Allocator],
                        help="optimized (default): every score predicts each type's ΔKLD (α·error; α = 1 for error, "
                             "rows x boost for pr15550, the entropy for entropy, seeded for random, measured for kld) and one Lagrangian "
                             "optimizer chooses over the wide menu; ranked: the rank-ordered 5-rung ladder that "
                             "entropy/error/random plans used before (to reproduce them)")
    budget.add_argument("--seed", type=int, default=PlanParams.seed, help="seed of --score random")
    budget.add_argument("--imatrix", type=Path, help="llama-imatrix GGUF weighting the columns of --score error / kld "
                                                     "(give the one the GGUF file will be quantized with)")
    kld = parser.add_argument_group("--score kld: measuring sensitivity (cached in --out-dir, per model and imatrix)")
    kld.add_argument("--calibration-windows", type=positive_int, help="calibration-text windows to measure on (2)")
    kld.add_argument("--calibration-context", type=positive_int, help="tokens per calibration window (512)")
    kld.add_argument("--sensitivity-band", type=positive_int, metavar="N",
                     help="measure each tensor kind over bands of N layers at once (N times fewer measurements, "
                          "one sensitivity per band); 1 = every tensor alone (default)")
    kld.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs for the measurement")
    kld.add_argument("--device-map", choices=DEVICE_MAPS,
                     help="spread the measured model over several GPUs with accelerate's strategy (every layer on a "
                          "GPU, or all on CPU: tensors are swapped in place, so none may be offloaded); none: all on "
                          "--device")
    kld.add_argument("--dtype", choices=["auto", *hf.DTYPES], help="the measurement's compute dtype (auto: float32 on "
                     "CPU, the checkpoint's on a GPU); the output projection, the log-softmax and the KLD run in "
                     "float32 whatever it is")
    kld.add_argument("--kld-arithmetic", choices=[a.value for a in Arithmetic],
                     help="whose matmuls the predictions model: cpu (default) adds the error of the inputs that "
                          "llama.cpp's CPU kernels round to int8 blocks for each weight type (Q8_0 / Q8_1 per 32 values, "
                          "Q8_K per 256 for K-quants and IQ4_XS), cuda that of CUDA's (Q8_1 per 32 for every type), "
                          "weights the weights' error alone (kld plans made before)")
    kld.add_argument("--correction-band", type=positive_int, metavar="N",
                     help="one correction round after the first allocation: with that whole plan applied, each tensor "
                          "kind over bands of N layers (1: each tensor) is put back to its original values, its marginal "
                          "ΔKLD over its predicted one scales its tensors' sensitivities, and the types are allocated "
                          "again (one forward pass of every layer per group, and a copy of half the model kept)")
    parser.add_argument("--out-dir", type=Path, default=PLANS_DIR, help="where the plan is written")
    add_dry_run_arg(parser)
    args = parser.parse_args(argv)
    if args.target_bpw is None and args.target_size is None and args.score != Score.ENTROPY.value:
        parser.error(f"--score {args.score} ranks tensors for a size budget: give --target-bpw or --target-size")
    if args.allocator is not None and args.target_bpw is None and args.target_size is None:
        parser.error("--allocator chooses types for a size budget: give --target-bpw or --target-size")
    budget_given = args.target_bpw is not None or args.target_size is not None
    predicting = budget_given and (args.allocator or Allocator.OPTIMIZED.value) == Allocator.OPTIMIZED.value
    if args.imatrix is not None and args.score not in (Score.ERROR.value, Score.KLD.value) and not predicting:
        parser.error("--imatrix weights the quantization error: it goes with a size budget (any score) or, with "
                     "--allocator ranked, with --score error or kld")
    if args.score == Score.PR15550.value and not predicting:
        parser.error("--score pr15550 predicts every type's cost: it goes with a size budget and the optimized allocator")
    if (args.calibration_windows or args.calibration_context or args.sensitivity_band or args.dtype
            or args.kld_arithmetic or args.device_map or args.correction_band) and args.score != Score.KLD.value:
        parser.error("--calibration-windows / --calibration-context / --sensitivity-band / --dtype / --kld-arithmetic "
                     "/ --device-map / --correction-band go with --score kld")
    if args.correction_band and not budget_given:
        parser.error("--correction-band corrects an allocation: give --target-bpw or --target-size")
    return args


def main(argv=None):
    args = parse_args(argv)
    imatrix = ImportanceMatrix.load(args.imatrix) if args.imatrix is not None else None
    score = Score(args.score)
    files = weights.open_model(args.model)
    device = hf.resolve_device(args.device) if score is Score.KLD else "cpu"
    dtype = hf.compute_dtype(device, args.dtype or "auto", model_dir=files.root) if score is Score.KLD else None
    params = PlanParams(granularity=Granularity(args.granularity), entropy_factor=args.entropy_factor,
                        fp16_factor=args.fp16_factor, bins=args.bins, keep_embeddings=args.keep_embeddings,
                        keep_lm_head=args.keep_lm_head, min_params=args.min_params, target_bpw=args.target_bpw,
                        target_bytes=parse_size(args.target_size) if args.target_size else None, score=score,
                        seed=args.seed if score is Score.RANDOM else PlanParams.seed,
                        imatrix_digest=file_digest(args.imatrix) if imatrix else None,
                        calibration_windows=args.calibration_windows, calibration_context=args.calibration_context,
                        sensitivity_band=args.sensitivity_band, correction_band=args.correction_band,
                        allocator=Allocator(args.allocator or Allocator.OPTIMIZED.value),  # threshold plans drop it
                        measure_dtype=None if dtype in (None, torch.float32) else hf.dtype_name(dtype),
                        kld_arithmetic=Arithmetic(args.kld_arithmetic or Arithmetic.CPU.value) if score is Score.KLD else None)
    check_writable_dir(args.out_dir)
    if args.dry_run:
        hash_ = plan_hash(weights.model_hash(files), params)
        rule = (f"size budget {args.target_bpw or args.target_size}, by {params.score.value}" if params.is_budget
                else f"entropy thresholds K={params.entropy_factor}, J={params.fp16_factor} at {params.granularity.value} level")
        if score is Score.KLD:
            per = f"per band of {params.sensitivity_band} layers" if params.sensitivity_band else "per tensor"
            where = f"{device}, device map {args.device_map}" if args.device_map else device
            rule += (f" (sensitivity measured {per} on {where} in {params.measure_dtype or 'float32'}, "
                     f"{params.calibration_windows} x "
                     f"{params.calibration_context} calibration tokens, cached in {args.out_dir})")
        return dry_run([f"read the {len(weights.list_tensors(files))} tensors of {files.root} one at a time "
                        f"({len(files.weight_files)} file(s)); entropy over {params.bins} bins",
                        f"decide by {rule}",
                        f"write {types_path(args.out_dir, hash_)}, {script_path(args.out_dir, hash_)} (llama-quantize "
                        f"--tensor-type-file) and {plan_path(args.out_dir, hash_)}"])
    plan = create_plan(files, params, imatrix, cache_dir=args.out_dir, device=device, model_id=args.model,
                       device_map=args.device_map)
    json_path, script = write_plan(plan, args.out_dir)
    log_plan(plan)
    print(json_path)
    print(script)


def log_plan(plan: Plan) -> None:
    """What the plan decided, in a few log lines."""
    summary = plan.summary()
    log("plan: " + ", ".join(f"{p}: {c.tensors} matrices" for p, c in summary.matrices_by_precision.items())
        + f"; blocks {summary.blocks_by_precision}")
    budget = plan.budget
    if budget:
        types = collections.Counter(t.llama_type.value for t in plan.tensors if t.is_matrix)
        log("gguf types: " + ", ".join(f"{name} {count}" for name, count in sorted(types.items())))
        if budget.gguf.predicted_kld is not None:
            log(f"predicted KLD (sum over tensors): gguf {budget.gguf.predicted_kld:.3g}"
                + (f", bitsandbytes {budget.bitsandbytes.predicted_kld:.3g}"
                   if budget.bitsandbytes.predicted_kld is not None else ""))
        log(f"budget {budget.budget_bits_per_weight:.3f} bits/weight: gguf reaches "
            f"{budget.gguf.bits_per_weight:.3f}, bitsandbytes {budget.bitsandbytes.bits_per_weight:.3f}"
            + ("" if budget.bitsandbytes.meets_budget else
               f" (its floor {budget.bitsandbytes.floor_bits_per_weight:.3f} exceeds the budget: all nf4)"))
    log(f"estimated bits/weight: gguf {summary.gguf_bits_per_weight:.2f}, "
        f"bitsandbytes {summary.bnb_bits_per_weight:.2f}")
