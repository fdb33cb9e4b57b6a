"""benchmark_gguf_{q4,q8,ewq}.py: build (or take) a GGUF file, prove it, measure it through llama.cpp.

    python -m ewq.commands.bench_gguf {Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K,Q8_0,EWQ,F16} [options]

Files are cached in --gguf-dir (default quantized_models/) under names that carry the model
hash, the type (and plan hash) and whether the importance matrix was used, so a second run
rebuilds nothing. One importance matrix, from "calibration"-role Wikipedia articles (disjoint
from the evaluation and summarization text), serves every quantized file, or none (--no-imatrix).
"""
from __future__ import annotations

import dataclasses
import sys
from argparse import ArgumentTypeError, BooleanOptionalAction
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends import hf
from ..backends.llamacpp import SPLIT_MODES, LlamaCppBackend, gguf_device
from ..bench import run as bench
from ..bench.inputs import load_data
from ..console import log
from ..errors import UserError
from ..llamacpp import toolchain
from ..llamacpp import gguf_read
from ..llamacpp import tools as llama_tools
from ..plan.files import plan_for_model, script_path
from ..plan.entries import Plan
from ..fileio import check_writable_dir
from ..results.record import LLAMA_CPP_PRESETS, Variant
from .bench_hf import prepare_run
from .common import PLANS_DIR, Parser, add_benchmark_args, add_plan_args, dry_run, positive_int, run_main

# The GGUF variants by the name their files and the command line use; the name of a llama.cpp preset
# is also its llama-quantize file type.
FILE_LABEL = {**{v: v.value.removeprefix("gguf-").upper() for v in LLAMA_CPP_PRESETS}, Variant.GGUF_EWQ: "EWQ",
              Variant.GGUF_F16: "F16"}


def parser_for(variant: Variant) -> Parser:
    parser = Parser(description=f"Benchmark the {FILE_LABEL[variant]} GGUF of a model through llama.cpp, with the "
                                "same metrics, tokens and settings as the Hugging Face variants.")
    add_benchmark_args(parser)
    parser.add_argument("--gguf", type=Path, help="evaluate this GGUF file instead of building one")
    parser.add_argument("--gguf-dir", type=Path, default=PLANS_DIR, help="where GGUF files are cached")
    parser.add_argument("--imatrix", action=BooleanOptionalAction, default=True,
                        help="quantize with the importance matrix (the same one for every quantized file)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for llama.cpp (default: torch's)")
    parser.add_argument("--split-mode", choices=SPLIT_MODES, default="layer",
                        help="how llama.cpp spreads the model over several GPUs (its --split-mode)")
    parser.add_argument("--tensor-split", type=tensor_split,
                        help="share of the model per GPU, e.g. 3,1 (llama.cpp's --tensor-split; default: by free memory)")
    if variant is Variant.GGUF_EWQ:
        add_plan_args(parser)
    return parser


def tensor_split(text: str) -> list[float]:
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        shares = []
    if not shares or any(not share >= 0 for share in shares) or not sum(shares) > 0:
        raise ArgumentTypeError(f"must be comma-separated non-negative shares such as 3,1, got {text}")
    return shares


@dataclass
class Files:
    """The GGUF files one run uses, cached by name in --gguf-dir (see the module doc)."""
    f16: Path
    imatrix: Path | None
    target: Path
    plan_file: Path | None = None
    plan: Plan | None = None  # EWQ only
    script: Path | None = None


def files_for(variant: Variant, args, model_hash: str) -> Files:
    gguf_dir = args.gguf_dir
    f16 = gguf_dir / f"{model_hash}-F16.gguf"
    if variant is Variant.GGUF_F16:
        return Files(f16, None, f16)
    imatrix = gguf_dir / f"{model_hash}-imatrix.gguf" if args.imatrix else None
    suffix = "-imat" if imatrix else ""
    if variant in LLAMA_CPP_PRESETS:
        return Files(f16, imatrix, gguf_dir / f"{model_hash}-{FILE_LABEL[variant]}{suffix}.gguf")
    plan_file, plan = plan_for_model(model_hash, args.plan, args.plans_dir)
    script = script_path(Path(plan_file).parent, plan.plan_hash)
    if not script.is_file():
        raise UserError(f"{script} is missing; re-run create_quantization_plan.py")
    return Files(f16, imatrix, gguf_dir / f"{model_hash}-EWQ-{plan.plan_hash}{suffix}.gguf", plan_file, plan, script)


def planned_files(files: Files, model_dir: Path) -> list[str]:
    def state(path: Path) -> str:
        return "cached" if path.is_file() else "to build"

    lines = [f"F16 GGUF {files.f16} ({state(files.f16)}, from {model_dir})"]
    if files.imatrix:
        lines.append(f"importance matrix {files.imatrix} ({state(files.imatrix)}, {llama_tools.IMATRIX_CHUNKS} x "
                     f"{llama_tools.IMATRIX_CONTEXT}-token chunks of calibration text)")
    if files.target != files.f16:
        how = f"plan {files.plan.plan_hash} via {files.script}" if files.plan else "llama-quantize"
        lines.append(f"quantized GGUF {files.target} ({state(files.target)}, {how})")
    return lines


def build(variant: Variant, files: Files, model_dir: Path) -> dict:
    """Build what is missing; return the plan check for EWQ."""
    files.f16.parent.mkdir(parents=True, exist_ok=True)
    llama_tools.convert_f16(model_dir, files.f16)
    if files.imatrix:
        llama_tools.build_imatrix(files.f16, llama_tools.calibration_file(files.f16.parent), files.imatrix,
                                 llama_tools.IMATRIX_CONTEXT, llama_tools.IMATRIX_CHUNKS)
    if variant is Variant.GGUF_F16:
        return {}
    if files.plan is not None:
        llama_tools.quantize_with_plan(files.script, files.f16, files.target, files.imatrix)
        return {"plan_hash": files.plan.plan_hash, "plan_file": str(files.plan_file),
                "plan_check": gguf_read.verify_plan(files.plan, files.target)}
    llama_tools.quantize(files.f16, files.target, FILE_LABEL[variant], files.imatrix)
    return {}


def main(argv=None, variant: Variant | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if variant is None:
        by_label = {label: v for v, label in FILE_LABEL.items()}
        if not argv or argv[0] not in by_label:
            raise UserError(f"usage: python -m ewq.commands.bench_gguf {{{','.join(by_label)}}} [options]")
        variant, argv = by_label[argv[0]], argv[1:]
    args = parser_for(variant).parse_args(argv)
    needed = ["llama-bench"] + ([] if args.gguf else ["llama-quantize", "llama-imatrix"])
    for name in needed:
        toolchain.tool(name)  # fail before any work if llama.cpp is not built
    skip, device, settings, model_files, model_hash = prepare_run(args, variant)
    if gguf_device(args.device, device) != device:
        device, settings = "cpu", dataclasses.replace(settings, device="cpu")
    files = None
    if args.gguf is not None:
        report = gguf_read.describe(args.gguf)  # refuses a file that is not GGUF, before any work
    else:
        files = files_for(variant, args, model_hash)
        check_writable_dir(args.gguf_dir)
    tokenizer = hf.load_tokenizer(model_files.root)
    data = load_data(tokenizer, settings)
    tag = files.plan.plan_hash if files and files.plan else None
    spec = bench.RunSpec(variant, args.model, model_hash, data, args.out_dir, tag=tag, skip=skip, resume=args.resume)
    if args.dry_run:
        source = [f"use {args.gguf} ({report.bits_per_weight:.2f} bits/weight)"] if files is None else \
            planned_files(files, model_files.root)
        return dry_run([*source, f"llama-bench pp{llama_tools.BENCH_PROMPT}/tg{llama_tools.BENCH_GEN}",
                        *bench.planned_run(spec)])
    if files is None:
        path, extra = args.gguf, {"imatrix": None}  # unknown for a file built elsewhere
    else:
        path, extra = files.target, build(variant, files, model_files.root)
        extra["imatrix"] = files.imatrix is not None
        report = gguf_read.describe(path)
    extra["gguf"] = report.to_json()
    log(f"{path}: {report.bits_per_weight:.2f} bits/weight, {report.details['file_bytes'] / 2**20:.1f} MiB, "
        f"types {report.details['type_histogram']}")
    threads = args.threads or torch.get_num_threads()
    extra["llama_bench"] = llama_tools.llama_bench(path, device, threads, args.split_mode, args.tensor_split)
    n_ctx = -(-data.longest_sequence // 256) * 256
    backend = LlamaCppBackend(path, device, variant.value, n_ctx, report, threads=threads, split_mode=args.split_mode,
                              tensor_split=args.tensor_split)
    out = bench.run(spec, backend, tokenizer, extra=extra)
    log(bench.summary_line(out))
    print(out)


if __name__ == "__main__":
    run_main(main)
