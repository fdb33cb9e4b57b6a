"""Entry points of the GGUF benchmarks: build (or take) a GGUF file, prove it, measure it.

    python -m ewq.gguf_runs {Q4_K_M,Q8_0,EWQ,F16} [options]   (benchmark_gguf_*.py call this)

Files are cached in --gguf-dir (default quantized_models/) under names that carry the model
hash, the type (and plan hash) and whether the importance matrix was used, so a second run
rebuilds nothing. One importance matrix, from "calibration"-role Wikipedia articles (disjoint
from the evaluation and summarization text), serves every quantized file, or none (--no-imatrix).
"""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import BooleanOptionalAction
from dataclasses import dataclass
from pathlib import Path

import torch

from . import assets, benchmark, gguf_files, llamacpp_build, results
from .benchmark import Variant
from .backends import hf
from .backends.llamacpp import LlamaCppBackend
from .cli import Parser, dry_run, log, positive_int, run_main
from .data import wiki
from .errors import UserError
from .plan import Plan, plan_for_model, script_path
from .results import write_text_atomic
from .runs import prepare_run

KINDS = {"Q4_K_M": Variant.GGUF_Q4_K_M.value, "Q8_0": Variant.GGUF_Q8_0.value, "EWQ": Variant.GGUF_EWQ.value,
         "F16": Variant.GGUF_F16.value}
IMATRIX_CONTEXT, IMATRIX_CHUNKS = 512, 100
BENCH_PROMPT, BENCH_GEN = 512, 128


def parser_for(kind: str) -> Parser:
    parser = Parser(description=f"Benchmark the {kind} GGUF of a model through llama.cpp, with the same "
                                "metrics, tokens and settings as the Hugging Face variants.")
    benchmark.add_common_args(parser)
    parser.add_argument("--gguf", type=Path, help="evaluate this GGUF file instead of building one")
    parser.add_argument("--gguf-dir", type=Path, default=Path("quantized_models"), help="where GGUF files are cached")
    parser.add_argument("--imatrix", action=BooleanOptionalAction, default=True,
                        help="quantize with the importance matrix (the same one for every quantized file)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for llama.cpp (default: torch's)")
    if kind == "EWQ":
        parser.add_argument("--plan", type=Path, help="plan JSON (default: the newest plan for this model's hash)")
        parser.add_argument("--plans-dir", type=Path, default=Path("quantized_models"), help="where plans are looked up")
    return parser


def calibration_file(gguf_dir: Path) -> Path:
    path = gguf_dir / "calibration_wiki.txt"
    if not path.is_file():
        text = "\n\n".join(f"{a.title}\n{a.lead}\n{a.body}" for a in wiki.articles_for(assets.wiki_file(), "calibration"))
        write_text_atomic(path, text)
    return path


def llama_bench(path: Path, device: str, threads: int) -> dict:
    command = [llamacpp_build.tool("llama-bench"), "-m", path, "-p", BENCH_PROMPT, "-n", BENCH_GEN, "-o", "json",
               "-t", threads, "-ngl", 99 if device == "cuda" else 0]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {result.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(result.stdout)
    out = {}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[key] = {"tokens_per_s": row["avg_ts"], "stddev": row["stddev_ts"], "repetitions": len(row["samples_ts"])}
    return out


@dataclass
class Files:
    """The GGUF files one run uses, cached by name in --gguf-dir (see the module doc)."""
    f16: Path
    imatrix: Path | None
    target: Path
    plan_file: Path | None = None
    plan: Plan | None = None  # EWQ only
    script: Path | None = None


def files_for(kind: str, args, model_hash: str) -> Files:
    gguf_dir = args.gguf_dir
    f16 = gguf_dir / f"{model_hash}-F16.gguf"
    if kind == "F16":
        return Files(f16, None, f16)
    imatrix = gguf_dir / f"{model_hash}-imatrix.gguf" if args.imatrix else None
    suffix = "-imat" if imatrix else ""
    if kind != "EWQ":
        return Files(f16, imatrix, gguf_dir / f"{model_hash}-{kind}{suffix}.gguf")
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
        lines.append(f"importance matrix {files.imatrix} ({state(files.imatrix)}, {IMATRIX_CHUNKS} x "
                     f"{IMATRIX_CONTEXT}-token chunks of calibration text)")
    if files.target != files.f16:
        how = f"plan {files.plan.plan_hash} via {files.script}" if files.plan else "llama-quantize"
        lines.append(f"quantized GGUF {files.target} ({state(files.target)}, {how})")
    return lines


def build(kind: str, files: Files, model_dir: Path) -> dict:
    """Build what is missing; return the plan check for EWQ."""
    files.f16.parent.mkdir(parents=True, exist_ok=True)
    gguf_files.convert_f16(model_dir, files.f16)
    if files.imatrix:
        gguf_files.build_imatrix(files.f16, calibration_file(files.f16.parent), files.imatrix,
                                 IMATRIX_CONTEXT, IMATRIX_CHUNKS)
    if kind == "F16":
        return {}
    if files.plan is not None:
        gguf_files.quantize_with_plan(files.script, files.f16, files.target, files.imatrix)
        return {"plan_hash": files.plan.plan_hash, "plan_file": str(files.plan_file),
                "plan_check": gguf_files.verify_plan(files.plan, files.target)}
    gguf_files.quantize(files.f16, files.target, kind, files.imatrix)
    return {}


def main(argv=None, kind: str | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if kind is None:
        if not argv or argv[0] not in KINDS:
            raise UserError(f"usage: python -m ewq.gguf_runs {{{','.join(KINDS)}}} [options]")
        kind, argv = argv[0], argv[1:]
    args = parser_for(kind).parse_args(argv)
    needed = ["llama-bench"] + ([] if args.gguf else ["llama-quantize", "llama-imatrix"])
    for name in needed:
        llamacpp_build.tool(name)  # fail before any work if llama.cpp is not built
    device, settings, model_files, model_hash = prepare_run(args)
    files = None
    if args.gguf is not None:
        report = gguf_files.describe(args.gguf)  # refuses a file that is not GGUF, before any work
    else:
        files = files_for(kind, args, model_hash)
        results.check_writable_dir(args.gguf_dir)
    tokenizer = hf.load_tokenizer(model_files.root)
    data = benchmark.load_data(tokenizer, settings)
    tag = files.plan.plan_hash if files and files.plan else None
    if args.dry_run:
        source = [f"use {args.gguf} ({report['bits_per_weight']:.2f} bits/weight)"] if files is None else \
            planned_files(files, model_files.root)
        return dry_run([*source, f"llama-bench pp{BENCH_PROMPT}/tg{BENCH_GEN}",
                        *benchmark.planned_run(KINDS[kind], tag, model_hash, data, args.out_dir, args.resume,
                                               tuple(args.skip))])
    if files is None:
        path, extra = args.gguf, {"imatrix": None}  # unknown for a file built elsewhere
    else:
        path, extra = files.target, build(kind, files, model_files.root)
        extra["imatrix"] = files.imatrix is not None
        report = gguf_files.describe(path)
    extra["gguf"] = report
    log(f"{path}: {report['bits_per_weight']:.2f} bits/weight, {report['file_bytes'] / 2**20:.1f} MiB, "
        f"types {report['type_histogram']}")
    threads = args.threads or torch.get_num_threads()
    extra["llama_bench"] = llama_bench(path, device, threads)
    n_ctx = -(-data.longest_sequence // 256) * 256
    backend = LlamaCppBackend(path, device, KINDS[kind], n_ctx, report, threads=threads)
    out = benchmark.run(KINDS[kind], backend, tokenizer, data, model_hash, args.model, args.out_dir, extra=extra,
                        tag=tag, skip=tuple(args.skip), resume=args.resume)
    log(benchmark.summary_line(out))
    print(out)


if __name__ == "__main__":
    run_main(main)
