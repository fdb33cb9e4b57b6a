"""Entry points of the Hugging Face benchmark scripts (original model, EWQ via bitsandbytes)."""
from __future__ import annotations

from pathlib import Path

from . import benchmark, results, weights
from .backends import hf
from .cli import Parser, dry_run, log
from .errors import UserError
from .plan import plan_for_model


def _parser(description: str) -> Parser:
    parser = Parser(description=description)
    benchmark.add_common_args(parser)
    return parser


def prepare_run(args):
    """Validate what every benchmark needs before any work: device, settings, model, output directory."""
    device = hf.resolve_device(args.device)
    settings = benchmark.settings_from_args(args, device)
    files = weights.open_model(args.model)
    model_hash = weights.model_hash(files)
    results.check_writable_dir(args.out_dir)
    log(f"model {files.root} (hash {model_hash}) on {device}, settings {settings.digest}"
        + (" [quick]" if args.quick else ""))
    return device, settings, files, model_hash


def original_main(argv=None) -> None:
    parser = _parser("Benchmark the original model (fp16 on GPU, fp32 on CPU); writes the KLD reference.")
    args = parser.parse_args(argv)
    if args.skip:
        raise UserError("the original run is every variant's reference: it cannot skip stages")
    device, settings, files, model_hash = prepare_run(args)
    tokenizer = hf.load_tokenizer(files.root)
    data = benchmark.load_data(tokenizer, settings)
    variant = benchmark.Variant.ORIGINAL.value
    if args.dry_run:
        return dry_run([f"load {files.root} in {hf.compute_dtype(device)}",
                        *benchmark.planned_run(variant, None, model_hash, data, args.out_dir, args.resume, tuple(args.skip))])
    model = hf.load_model(files.root, device, hf.compute_dtype(device))
    backend = hf.HFBackend(model, device, "original", hf.dense_weights_report(model))
    path = benchmark.run(variant, backend, tokenizer, data, model_hash, args.model, args.out_dir,
                         skip=tuple(args.skip), resume=args.resume)
    log(benchmark.summary_line(path))
    print(path)


def ewq_main(argv=None) -> None:
    parser = _parser("Benchmark the model with an EWQ plan applied through bitsandbytes (int8 / nf4 / fp16).")
    parser.add_argument("--plan", type=Path, help="plan JSON (default: the newest plan for this model's hash)")
    parser.add_argument("--plans-dir", type=Path, default=Path("quantized_models"), help="where plans are looked up")
    args = parser.parse_args(argv)
    device, settings, files, model_hash = prepare_run(args)
    plan_file, plan = plan_for_model(model_hash, args.plan, args.plans_dir)
    log(f"plan {plan_file} ({plan.plan_hash})")
    tokenizer = hf.load_tokenizer(files.root)
    data = benchmark.load_data(tokenizer, settings)
    variant = benchmark.Variant.EWQ_BNB.value
    if args.dry_run:
        counts = {p: c["tensors"] for p, c in plan.summary()["matrices_by_precision"].items()}
        return dry_run([f"apply plan {plan.plan_hash} through bitsandbytes: matrices {counts}",
                        *benchmark.planned_run(variant, plan.plan_hash, model_hash, data, args.out_dir, args.resume,
                                               tuple(args.skip))])
    from . import bnb

    dtype = hf.compute_dtype(device)
    model = hf.load_model(files.root, "cpu", dtype)
    applied = bnb.apply_plan(model, plan, device, dtype)
    report = bnb.read_back(model, plan, applied["not_applicable"])
    report["dtype"] = str(dtype).removeprefix("torch.")
    log(f"bitsandbytes read-back: {report['bits_per_weight']:.2f} bits/weight, {report['weight_bytes'] / 2**20:.1f} MiB")
    backend = hf.HFBackend(model, device, "ewq-bnb", report)
    path = benchmark.run(variant, backend, tokenizer, data, model_hash, args.model, args.out_dir,
                         extra={"plan_hash": plan.plan_hash, "plan_file": str(plan_file), "plan_summary": plan.summary()},
                         tag=plan.plan_hash, skip=tuple(args.skip), resume=args.resume)
    log(benchmark.summary_line(path))
    print(path)
