"""benchmark_original.py and benchmark_ewq.py: the Hugging Face model as it is, and with a plan
applied through bitsandbytes."""
from __future__ import annotations

from .. import weights
from ..backends import hf
from ..bench import run as bench
from ..bench.inputs import load_data
from ..bench.settings import preset_name, settings_from_args
from ..console import log
from ..plan.files import plan_for_model
from ..fileio import check_writable_dir
from ..results.record import Stage, Variant
from .common import Parser, add_benchmark_args, add_hf_engine_args, add_plan_args, dry_run


def prepare_run(args, variant: Variant):
    """Validate what every benchmark needs before any work: stages, device, settings, model, output directory."""
    skip = tuple(Stage(s) for s in args.skip)
    bench.check_skip(variant, skip)
    device = hf.resolve_device(args.device)
    settings = settings_from_args(args, device)
    files = weights.open_model(args.model)
    model_hash = weights.model_hash(files)
    check_writable_dir(args.out_dir)
    log(f"model {files.root} (hash {model_hash}) on {device}, settings {settings.digest}"
        + f" [{preset_name(args)}]")
    return skip, device, settings, files, model_hash


def original_main(argv=None) -> None:
    parser = Parser(description="Benchmark the original model (its checkpoint's dtype on GPU, fp32 on CPU); "
                                "writes the KLD reference.")
    add_benchmark_args(parser)
    add_hf_engine_args(parser)
    args = parser.parse_args(argv)
    variant = Variant.ORIGINAL
    skip, device, settings, files, model_hash = prepare_run(args, variant)
    tokenizer = hf.load_tokenizer(files.root)
    data = load_data(tokenizer, settings)
    dtype = hf.compute_dtype(device, args.dtype, files.root)
    spec = bench.RunSpec(variant, args.model, model_hash, data, args.out_dir, skip=skip, resume=args.resume)
    if args.dry_run:
        return dry_run([f"load {files.root} in {dtype}" + (f", device map {args.device_map}" if args.device_map else ""),
                        *bench.planned_run(spec)])
    model = hf.load_model(files.root, device, dtype, args.device_map)
    backend = hf.HFBackend(model, device, "original", hf.dense_weights_report(model), args.batch_size)
    path = bench.run(spec, backend, tokenizer)
    log(bench.summary_line(path))
    print(path)


def ewq_main(argv=None) -> None:
    parser = Parser(description="Benchmark the model with an EWQ plan applied through bitsandbytes (int8 / nf4 / fp16).")
    add_benchmark_args(parser)
    add_hf_engine_args(parser)
    add_plan_args(parser)
    args = parser.parse_args(argv)
    variant = Variant.EWQ_BNB
    skip, device, settings, files, model_hash = prepare_run(args, variant)
    plan_file, plan = plan_for_model(model_hash, args.plan, args.plans_dir)
    log(f"plan {plan_file} ({plan.plan_hash})")
    tokenizer = hf.load_tokenizer(files.root)
    data = load_data(tokenizer, settings)
    dtype = hf.compute_dtype(device, args.dtype, files.root)
    spec = bench.RunSpec(variant, args.model, model_hash, data, args.out_dir, tag=plan.plan_hash, skip=skip,
                         resume=args.resume)
    if args.dry_run:
        counts = {p: c.tensors for p, c in plan.summary().matrices_by_precision.items()}
        return dry_run([f"load {files.root} tensor by tensor in {dtype}, "
                        f"applying plan {plan.plan_hash} through bitsandbytes: matrices {counts}",
                        *bench.planned_run(spec)])
    from .. import bnb_model

    model, not_applicable = bnb_model.load_quantized(files, plan, device, dtype, args.device_map)
    report = bnb_model.read_back(model, plan, not_applicable)
    report.details["dtype"] = hf.dtype_name(dtype)
    log(f"bitsandbytes read-back: {report.bits_per_weight:.2f} bits/weight, {report.weight_bytes / 2**20:.1f} MiB")
    backend = hf.HFBackend(model, device, "ewq-bnb", report, args.batch_size)
    path = bench.run(spec, backend, tokenizer, extra={"plan_hash": plan.plan_hash, "plan_file": str(plan_file),
                                                      "plan_summary": plan.summary().to_json()})
    log(bench.summary_line(path))
    print(path)
