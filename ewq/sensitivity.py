"""Does entropy predict sensitivity? Quantize one unit at a time and measure the damage.

A unit is one transformer block (all its matrices) or one tensor kind (e.g. every attn_v).
For each unit, its matrices are replaced in the Hugging Face model by their llama.cpp 4-bit
round trip (Q4_K, or Q4_0 where Q4_K blocks do not divide the rows: the plan's 4-bit rule,
optionally weighted by the importance matrix as llama-quantize does), everything else stays
exact, and the KL divergence to the unmodified model is measured on the same token windows.
Then Spearman's rho (with a bootstrap interval over units) relates that sensitivity to the
unit's entropy and to simpler statistics: numel, std, excess kurtosis, max|w|/std and the
measured 4-bit relative error itself.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import ggml_quant, llamacpp
from .backends.base import Backend
from .cli import progress
from .metrics import perplexity
from .metrics.stats import paired_difference, spearman_bootstrap
from .plan import Plan, Precision, TensorEntry, llama_type_for

PREDICTORS = ("entropy_bits", "numel", "std", "excess_kurtosis", "max_abs_over_std", "q4_relative_error")


class Level:
    BLOCK = "block"
    KIND = "kind"


@dataclass
class Unit:
    level: str
    label: str
    tensors: list[TensorEntry]


def tensor_kind(entry: TensorEntry) -> str:
    """'attn_v' for blk.3.attn_v.weight (GGUF names are uniform across architectures)."""
    name = entry.gguf_name or entry.hf_name
    parts = name.split(".")
    return parts[2] if len(parts) > 3 and parts[0] == "blk" else ".".join(parts[:-1])


def units(plan: Plan, levels: tuple[str, ...]) -> list[Unit]:
    matrices = [t for t in plan.tensors if t.is_matrix and t.block is not None]
    out = []
    if Level.BLOCK in levels:
        for block in sorted({t.block for t in matrices}):
            out.append(Unit(Level.BLOCK, f"blk.{block}", [t for t in matrices if t.block == block]))
    if Level.KIND in levels:
        for kind in sorted({tensor_kind(t) for t in matrices}):
            out.append(Unit(Level.KIND, kind, [t for t in matrices if tensor_kind(t) == kind]))
    return out


def weighted(unit: Unit, key: str, values: dict[str, float] | None = None) -> float:
    """Parameter-weighted mean of a per-tensor statistic over the unit."""
    total = sum(t.numel for t in unit.tensors)
    get = (lambda t: values[t.hf_name]) if values is not None else (lambda t: getattr(t, key))
    return math.fsum(get(t) * t.numel for t in unit.tensors) / total


@contextmanager
def quantized(model: torch.nn.Module, unit: Unit, imatrix: dict[str, np.ndarray] | None, errors: dict[str, float]):
    """Swap the unit's matrices for their 4-bit round trip; restore them afterwards."""
    saved = {}
    try:
        for entry in unit.tensors:
            param = model.get_parameter(entry.hf_name)
            saved[entry.hf_name] = param.data.clone()
            original = param.data.float().cpu().numpy()
            ggml_type = llamacpp.parse_type(llama_type_for(Precision.INT4, entry))
            importance = imatrix.get(entry.gguf_name) if imatrix else None
            approx = ggml_quant.round_trip(original, ggml_type, importance)
            if entry.hf_name not in errors:
                errors[entry.hf_name] = ggml_quant.weighted_error(original, approx, importance)
            param.data.copy_(torch.from_numpy(approx).to(param.dtype))
        yield
    finally:
        for name, data in saved.items():
            model.get_parameter(name).data.copy_(data)


def measure(model: torch.nn.Module, backend: Backend, tokens: list[int], spec: perplexity.WindowSpec,
            plan: Plan, levels: tuple[str, ...], imatrix: dict[str, np.ndarray] | None,
            done: Sequence[dict] = (), on_row: Callable[[list[dict]], None] | None = None) -> dict:
    """The study. `done` holds the rows of the first units from an interrupted run (the unmodified
    model's reference is recomputed: it is deterministic); `on_row` gets all rows after each unit."""
    starts = perplexity.window_starts(len(tokens), spec)
    n_windows = min(spec.kld_windows, len(starts))
    vocab = backend.logprobs(tokens[:2]).shape[-1]
    reference = np.empty((n_windows * spec.stride, vocab), dtype=np.float16)
    base = perplexity.evaluate(backend, tokens, spec, record=reference)
    errors: dict[str, float] = {}
    rows = list(done)
    for unit in progress(units(plan, levels)[len(rows):], desc="sensitivity", unit="unit"):
        with quantized(model, unit, imatrix, errors):
            result = perplexity.evaluate(backend, tokens, spec, reference=reference)
        row = {
            "level": unit.level,
            "unit": unit.label,
            "tensors": [t.gguf_name or t.hf_name for t in unit.tensors],
            "types": sorted({llama_type_for(Precision.INT4, t) for t in unit.tensors}),
            "kld": {k: result["kld"][k] for k in ("mean", "se", "p99", "n_windows", "n_tokens")},
            "mean_nll_delta": paired_difference(result["per_window_nll"], base["per_window_nll"]),
            "numel": sum(t.numel for t in unit.tensors),
        }
        for key in PREDICTORS:
            if key == "q4_relative_error":
                row[key] = weighted(unit, key, errors)
            elif key != "numel":
                row[key] = weighted(unit, key)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return {"base_ppl": base["ppl"], "units": rows, "correlations": correlations(rows)}


def correlations(rows: list[dict]) -> dict:
    """Spearman's rho of every predictor against KLD, per level, with a bootstrap interval."""
    out = {}
    for level in sorted({r["level"] for r in rows}):
        subset = [r for r in rows if r["level"] == level]
        kld = [r["kld"]["mean"] for r in subset]
        out[level] = {key: spearman_bootstrap([r[key] for r in subset], kld) for key in PREDICTORS}
    return out


# --- the study script ------------------------------------------------------------------------

def main(argv=None) -> None:
    from pathlib import Path

    from . import assets, benchmark, plots, results, weights
    from .budget import file_digest
    from .checkpoint import Checkpoint
    from .backends import hf
    from .cli import Parser, dry_run, log, positive_int
    from .errors import UserError
    from .plan import plan_for_model

    parser = Parser(description="Measure, per transformer block and per tensor kind, the KLD vs the original "
                                "when only that unit is quantized to 4 bits, and correlate it with entropy.")
    parser.add_argument("--model", default=assets.default_model(), help="HF hub id or local model directory")
    parser.add_argument("--plan", type=Path, help="plan JSON with the entropy statistics; None: the newest for the model in --plans-dir")
    parser.add_argument("--plans-dir", type=Path, default=Path("quantized_models"), help="where plans are looked up")
    parser.add_argument("--imatrix", type=Path, help="llama-imatrix GGUF to weight the 4-bit quantization "
                                                     "(as the GGUF files are); None: unweighted")
    parser.add_argument("--levels", default="block,kind", help="comma-separated: block, kind")
    parser.add_argument("--windows", type=positive_int, default=16, help="token windows (each scores --stride tokens)")
    parser.add_argument("--context", type=positive_int, default=benchmark.FULL["context"], help="window length in tokens")
    parser.add_argument("--stride", type=positive_int, default=benchmark.FULL["stride"], help="tokens scored per window")
    parser.add_argument("--eval-text", default=benchmark.GENSIM_WIKI, help="as for the benchmarks")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmark_results"), help="where the JSON and PNG go")
    parser.add_argument("--dry-run", action="store_true", help="validate the inputs, print what would run, write nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study from its checkpoint")
    args = parser.parse_args(argv)

    levels = tuple(level.strip() for level in args.levels.split(",") if level.strip())
    unknown = set(levels) - {Level.BLOCK, Level.KIND}
    if not levels or unknown:
        raise UserError(f"--levels takes block and/or kind, got {args.levels!r}")
    spec = perplexity.WindowSpec(args.context, args.stride, args.windows, args.windows)
    spec.validate()
    device = hf.resolve_device(args.device)
    files = weights.open_model(args.model)
    model_hash = weights.model_hash(files)
    plan_file, plan = plan_for_model(model_hash, args.plan, args.plans_dir)
    imatrix = ggml_quant.load_imatrix(args.imatrix) if args.imatrix else None
    results.check_writable_dir(args.out_dir)
    tokenizer = hf.load_tokenizer(files.root)
    tokens = tokenizer.encode(benchmark.load_eval_text(args.eval_text), add_special_tokens=False)
    perplexity.window_starts(len(tokens), spec)  # refuses a text shorter than one window
    stem = f"sensitivity_{model_hash}_{plan.plan_hash}"
    if args.dry_run:
        todo = units(plan, levels)
        return dry_run([f"measure KLD of {len(todo)} units ({', '.join(levels)}) one at a time in 4 bits, "
                        f"{args.windows} windows x {args.stride} tokens, imatrix {args.imatrix or 'none'}",
                        f"write {args.out_dir / (stem + '.json')} and {stem}.png"])
    out_dir = results.ensure_writable_dir(args.out_dir)
    log(f"model {files.root} (hash {model_hash}) on {device}; plan {plan_file}; "
        f"{args.windows} windows x {args.stride} tokens; imatrix {args.imatrix or 'none'}")
    model = hf.load_model(files.root, device, hf.compute_dtype(device))
    backend = hf.HFBackend(model, device, "sensitivity", hf.dense_weights_report(model))
    tokens_digest = perplexity.tokens_digest(tokens[: spec.max_windows * spec.stride + spec.context])
    fingerprint = {"model_hash": model_hash, "plan_hash": plan.plan_hash, "levels": list(levels), "device": device,
                   "windows": [spec.context, spec.stride, spec.max_windows], "tokens": tokens_digest,
                   "imatrix": file_digest(args.imatrix) if args.imatrix else None}
    ckpt = Checkpoint(out_dir, stem, fingerprint, args.resume)
    done = ckpt.partial("units")
    study = measure(model, backend, tokens, spec, plan, levels, imatrix, done=done,
                    on_row=lambda rows: ckpt.save_partial("units", rows))

    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    plots.sensitivity_scatter(study["units"], study["correlations"], PREDICTORS, png_path)
    results.write_json_atomic(json_path, {
        "kind": "sensitivity-study",
        "model": args.model, "model_hash": model_hash, "plan_file": str(plan_file), "plan_hash": plan.plan_hash,
        "method": __doc__.strip(), "four_bit_rule": "Q4_K where its 256-blocks divide the rows, else Q4_0",
        "imatrix": str(args.imatrix) if args.imatrix else None,
        "windows": {"context": spec.context, "stride": spec.stride, "n_windows": spec.max_windows,
                    "tokens_sha256_16": tokens_digest},
        "device": device, "environment": results.environment(), "created_utc": results.timestamp(),
        **study, "plot": png_path.name, "resumed_units": len(done),
    })
    ckpt.remove()
    for level, stats in study["correlations"].items():
        log(f"{level}: " + ", ".join(
            f"{key} rho={'n/a' if s['rho'] is None else format(s['rho'], '+.2f')}"
            + (f" [{s['ci'][0]:+.2f},{s['ci'][1]:+.2f}]" if s.get("ci") else "") for key, s in stats.items()))
    print(json_path)
    print(png_path)
