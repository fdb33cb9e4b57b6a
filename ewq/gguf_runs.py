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
from pathlib import Path

import torch

from . import assets, benchmark, gguf_files, llamacpp_build
from .benchmark import Variant
from .backends import hf
from .backends.llamacpp import LlamaCppBackend
from .cli import Parser, log, positive_int, run_main
from .data import wiki
from .errors import UserError
from .plan import plan_for_model, script_path
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


def build_file(kind: str, args, files, model_hash: str) -> tuple[Path, dict]:
    gguf_dir = args.gguf_dir
    gguf_dir.mkdir(parents=True, exist_ok=True)
    f16 = gguf_files.convert_f16(files.root, gguf_dir / f"{model_hash}-F16.gguf")
    extra: dict = {}
    if kind == "F16":
        return f16, extra
    imatrix = None
    if args.imatrix:
        imatrix = gguf_files.build_imatrix(f16, calibration_file(gguf_dir), gguf_dir / f"{model_hash}-imatrix.gguf",
                                           IMATRIX_CONTEXT, IMATRIX_CHUNKS)
    suffix = "-imat" if imatrix else ""
    if kind == "EWQ":
        plan_file, plan = plan_for_model(model_hash, args.plan, args.plans_dir)
        script = script_path(Path(plan_file).parent, plan.plan_hash)
        if not script.is_file():
            raise UserError(f"{script} is missing; re-run create_quantization_plan.py")
        target = gguf_files.quantize_with_plan(script, f16, gguf_dir / f"{model_hash}-EWQ-{plan.plan_hash}{suffix}.gguf",
                                               imatrix)
        extra["plan_hash"] = plan.plan_hash
        extra["plan_file"] = str(plan_file)
        extra["plan_check"] = gguf_files.verify_plan(plan, target)
    else:
        target = gguf_files.quantize(f16, gguf_dir / f"{model_hash}-{kind}{suffix}.gguf", kind, imatrix)
    return target, extra


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
    device, settings, files, model_hash = prepare_run(args)
    tokenizer = hf.load_tokenizer(files.root)
    data = benchmark.load_data(tokenizer, settings)
    extra: dict = {}
    if args.gguf is not None:
        path = args.gguf  # describe() below refuses a file that is not GGUF, before any work
        extra["imatrix"] = None  # unknown for a file built elsewhere
    else:
        path, extra = build_file(kind, args, files, model_hash)
        extra["imatrix"] = bool(args.imatrix) and kind != "F16"
    report = gguf_files.describe(path)
    extra["gguf"] = report
    log(f"{path}: {report['bits_per_weight']:.2f} bits/weight, {report['file_bytes'] / 2**20:.1f} MiB, "
        f"types {report['type_histogram']}")
    threads = args.threads or torch.get_num_threads()
    extra["llama_bench"] = llama_bench(path, device, threads)
    n_ctx = -(-data.longest_sequence // 256) * 256
    backend = LlamaCppBackend(path, device, KINDS[kind], n_ctx, report, threads=threads)
    out = benchmark.run(KINDS[kind], backend, tokenizer, data, model_hash, args.model, args.out_dir, extra=extra)
    log(benchmark.summary_line(out))
    print(out)


if __name__ == "__main__":
    run_main(main)
