"""study_sensitivity.py: KLD when only one block (or tensor kind) is 4-bit, against its statistics."""
from __future__ import annotations

from pathlib import Path

from .. import rearranged, study, weights
from ..backends import hf
from ..bench.inputs import load_eval_text
from ..bench.settings import FULL, GENSIM_WIKI
from ..console import log
from ..errors import UserError
from ..llamacpp.quantizers import ImportanceMatrix
from ..metrics import perplexity
from ..plan.files import plan_for_model
from ..report import plots
from .. import fileio
from ..results import environment
from ..results.checkpoint import Checkpoint
from .common import DEVICES, RESULTS_DIR, Parser, add_dry_run_arg, add_model_arg, add_plan_args, dry_run, positive_int


def parse_args(argv):
    parser = Parser(description="Measure, per transformer block and per tensor kind, the KLD vs the original "
                                "when only that unit is quantized to 4 bits, and correlate it with entropy.")
    add_model_arg(parser)
    add_plan_args(parser, "plan JSON with the entropy statistics")
    parser.add_argument("--imatrix", type=Path, help="llama-imatrix GGUF to weight the 4-bit quantization "
                                                     "(as the GGUF files are); None: unweighted")
    parser.add_argument("--levels", default="block,kind", help="comma-separated: block, kind")
    parser.add_argument("--windows", type=positive_int, default=16, help="token windows (each scores --stride tokens)")
    parser.add_argument("--context", type=positive_int, default=FULL["context"], help="window length in tokens")
    parser.add_argument("--stride", type=positive_int, default=FULL["stride"], help="tokens scored per window")
    parser.add_argument("--eval-text", default=GENSIM_WIKI, help="as for the benchmarks")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and PNG go")
    add_dry_run_arg(parser)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study from its checkpoint")
    return parser.parse_args(argv)


def parse_levels(text: str) -> tuple[study.Level, ...]:
    names = [level.strip() for level in text.split(",") if level.strip()]
    known = {level.value for level in study.Level}
    if not names or set(names) - known:
        raise UserError(f"--levels takes block and/or kind, got {text!r}")
    return tuple(study.Level(name) for name in names)


def main(argv=None) -> None:
    args = parse_args(argv)
    levels = parse_levels(args.levels)
    spec = perplexity.WindowSpec(args.context, args.stride, args.windows, args.windows)
    spec.validate()
    device = hf.resolve_device(args.device)
    files = weights.open_model(args.model)
    model_hash = weights.model_hash(files)
    plan_file, plan = plan_for_model(model_hash, args.plan, args.plans_dir)
    imatrix = ImportanceMatrix.load(args.imatrix) if args.imatrix else None
    fileio.check_writable_dir(args.out_dir)
    tokenizer = hf.load_tokenizer(files.root)
    tokens = tokenizer.encode(load_eval_text(args.eval_text), add_special_tokens=False)
    perplexity.window_starts(len(tokens), spec)  # refuses a text shorter than one window
    stem = f"sensitivity_{model_hash}_{plan.plan_hash}"
    if args.dry_run:
        todo = study.units(plan, levels)
        return dry_run([f"measure KLD of {len(todo)} units ({', '.join(level.value for level in levels)}) one at a "
                        f"time in 4 bits, {args.windows} windows x {args.stride} tokens, imatrix {args.imatrix or 'none'}",
                        f"write {args.out_dir / (stem + '.json')} and {stem}.png"])
    out_dir = fileio.ensure_writable_dir(args.out_dir)
    log(f"model {files.root} (hash {model_hash}) on {device}; plan {plan_file}; "
        f"{args.windows} windows x {args.stride} tokens; imatrix {args.imatrix or 'none'}")
    model = hf.load_model(files.root, device, hf.compute_dtype(device, model_dir=files.root))
    parts = rearranged.model_parts(files.root) if any(t.source for t in plan.tensors) else None
    tokens_digest = perplexity.tokens_digest(tokens[: spec.max_windows * spec.stride + spec.context])
    fingerprint = {"model_hash": model_hash, "plan_hash": plan.plan_hash, "levels": [level.value for level in levels],
                   "device": device, "windows": [spec.context, spec.stride, spec.max_windows], "tokens": tokens_digest,
                   "imatrix": fileio.file_digest(args.imatrix) if args.imatrix else None}
    ckpt = Checkpoint(out_dir, stem, fingerprint, args.resume)
    done = ckpt.partial("units")
    service = study.study_service(model, tokens, spec, imatrix, parts)
    found = study.measure(service, plan, levels, done=done, on_row=lambda rows: ckpt.save_partial("units", rows))

    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    document = {
        "kind": study.STUDY_KIND,
        "model": args.model, "model_hash": model_hash, "plan_file": str(plan_file), "plan_hash": plan.plan_hash,
        "method": study.__doc__.strip(), "four_bit_rule": study.FOUR_BIT_RULE,
        "imatrix": str(args.imatrix) if args.imatrix else None,
        "windows": {"context": spec.context, "stride": spec.stride, "n_windows": spec.max_windows,
                    "tokens_sha256_16": tokens_digest},
        "device": device, "environment": environment.environment(), "created_utc": environment.timestamp(),
        **found, "plot": png_path.name, "resumed_units": len(done),
    }
    written = study.StudyFile.from_json(document)
    plots.sensitivity_scatter(written.units, written.correlations, study.PREDICTORS, png_path)
    fileio.write_json_atomic(json_path, document)
    ckpt.remove()
    for level, stats in written.correlations.items():
        log(f"{level}: " + ", ".join(
            f"{key} rho={'n/a' if s.rho is None else format(s.rho, '+.2f')}"
            + (f" [{s.ci[0]:+.2f},{s.ci[1]:+.2f}]" if s.ci else "") for key, s in stats.items()))
    print(json_path)
    print(png_path)
