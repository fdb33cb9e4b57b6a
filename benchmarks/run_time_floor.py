"""The main job's benchmark time against the least its work can take on this machine (issue 11), printed.

    python -m benchmarks.run_time_floor [--model DIR] [--results-dir benchmark_results] [--preset P | --quick]
                                        [--json PATH]

For each of run_main.sh's five variants, from its newest result of the preset (default model) that ran
every stage (a run with --skip is not the main job's; each file used is logged):
- work: the prompt tokens its stages process (perplexity windows x context, every MMLU prompt, every
  generation prompt once) and, for the first GGUF benchmark, the importance matrix's chunks;
- rate: the fastest this machine runs that work on the variant's engine, measured here.
  llama.cpp: llama-bench's best prompt-processing rate over prompts of 64, 128 and 512 tokens (a whole
  forward pass, output at the last position only) of the result's GGUF file, and of the F16 file for
  the importance matrix. Hugging Face (the float32 original, the plan through bitsandbytes): every
  linear layer but the LM head, timed alone on random inputs of 2,048 rows; attention, norms and
  activations are left out, and so is the LM head (it runs at the scored positions only);
- floor = work / rate, beside the run's own eval_seconds (every stage, decoding included).
And the MMLU stage alone through the original: the most questions/s its prompts allow at that rate.
Decoding, loading, conversion and quantization are not in the floor: a lower bound on these engines at
the machine's speed of the moment (measured after the run: a shared machine's speed moves), not an
estimate. The sum is compared with the 40 minutes the issue asks of the whole job.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

TARGET_S = 40 * 60
FLOOR_PROMPTS = (64, 128, 512)  # llama-bench prompt lengths; the best rate counts
LINEAR_ROWS = 2048  # rows of the random input of each timed linear layer
FIVE = ("original", "ewq-bnb", "gguf-q4_k_m", "gguf-q8_0", "gguf-ewq")  # run_main.sh's order


def newest_results(results_dir: Path, model_hash: str, digest: str) -> dict:
    """{variant: Result}, the newest result of each of FIVE for this model and settings digest that ran
    every stage, as run_main.sh does (a later run with --skip, e.g. a budget plan's perplexity-only
    benchmark in the same folder, is not the main job's)."""
    from ewq.errors import UserError
    from ewq.results.record import read_result

    found: dict = {}
    for path in results_dir.glob("*.json"):
        result = read_result(path)
        if (result is not None and result.variant in FIVE and result.model_hash == model_hash
                and result.settings_digest == digest and not result.skipped_stages
                and result.created_utc > getattr(found.get(result.variant), "created_utc", "")):
            found[result.variant] = result
    missing = [v for v in FIVE if v not in found]
    if missing:
        raise UserError(f"no result of {', '.join(missing)} with settings {digest} and every stage run in "
                        f"{results_dir}; run scripts/run_main.sh (with the same preset) first")
    return found


def prompt_tokens(data) -> int:
    """Prompt tokens a benchmark's stages process: every perplexity window, MMLU prompt and generation prompt."""
    from ewq.metrics.perplexity import window_starts

    windows = len(window_starts(len(data.tokens), data.settings.window_spec)) * data.settings.context
    return windows + sum(map(len, data.mmlu_prompts)) + sum(map(len, data.request_prompts))


def llama_cpp_rate(path: Path, threads: int) -> float:
    """Tokens/s: llama-bench's best prompt processing over FLOOR_PROMPTS on the CPU (3 repetitions each)."""
    from ewq.llamacpp.tools import llama_bench
    from ewq.errors import UserError

    if not path.is_file():
        raise UserError(f"{path} is missing (run this where run_main.sh ran; --gguf-dir for the F16 file)")
    rates = llama_bench(path, "cpu", threads, prompts=FLOOR_PROMPTS, gen=0, repetitions=3)
    return max(rate["tokens_per_s"] for rate in rates.values())


@torch.inference_mode()
def linear_rate(model) -> float:
    """Tokens/s through every linear layer of `model` but its LM head, each timed alone (best of 3)
    on a random float input [LINEAR_ROWS, in_features] in the model's dtype."""
    head = model.get_output_embeddings()
    dtype = next(model.parameters()).dtype
    seconds = 0.0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue  # bitsandbytes' Linear8bitLt and Linear4bit are Linear subclasses
        x = torch.randn(LINEAR_ROWS, module.in_features, dtype=dtype)
        module(x)  # warm-up (bitsandbytes prepares its state on the first call)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            module(x)
            best = min(best, time.perf_counter() - start)
        seconds += best
    return LINEAR_ROWS / seconds


def main(argv=None) -> None:
    from benchmarks.generation_cost import load
    from ewq import assets, weights
    from ewq.backends import hf
    from ewq.bench import settings
    from ewq.bench.inputs import load_data
    from ewq.llamacpp.tools import IMATRIX_CHUNKS, IMATRIX_CONTEXT
    from ewq.commands.common import Parser, PLANS_DIR, RESULTS_DIR
    from ewq.console import log
    from ewq.fileio import write_json_atomic

    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(assets.default_model()), help="the model run_main.sh ran")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where run_main.sh wrote its results")
    parser.add_argument("--gguf-dir", type=Path, default=PLANS_DIR, help="where its GGUF files are")
    parser.add_argument("--preset", choices=tuple(settings.PRESETS), help="the preset of the run's results (default: "
                        f"{settings.DEFAULT_PRESET})")
    parser.add_argument("--quick", action="store_true", help="--preset quick")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    files = weights.open_model(str(args.model))
    model_hash = weights.model_hash(files)
    eval_settings = settings.EvalSettings(device="cpu", **settings.PRESETS[settings.preset_name(args)])
    results = newest_results(args.results_dir, model_hash, eval_settings.digest)
    data = load_data(hf.load_tokenizer(files.root), eval_settings)
    threads = torch.get_num_threads()
    work = prompt_tokens(data)  # the same for every variant
    rows = []  # (variant, prompt tokens, tokens/s, floor s, measured s)
    for variant in FIVE:
        result = results[variant]
        log(f"{variant} ({result.file}): measuring the rate of its engine")
        if variant.startswith("gguf"):
            rate = llama_cpp_rate(Path(result.gguf_file), threads)
        else:
            plan = Path(result.plan_file) if result.plan_file else None
            rate = linear_rate(load(files.root, plan).model)
        rows.append((variant, work, rate, work / rate, result.eval_seconds))
    f16 = args.gguf_dir / f"{model_hash}-F16.gguf"
    imatrix_work = IMATRIX_CHUNKS * IMATRIX_CONTEXT
    imatrix_rate = llama_cpp_rate(f16, threads)
    rows.insert(2, ("importance matrix (F16)", imatrix_work, imatrix_rate, imatrix_work / imatrix_rate, None))

    print(f"{'':<26}{'prompt tokens':>14}{'tokens/s':>10}{'floor':>9}{'measured':>10}")
    for name, tokens, rate, floor, measured in rows:
        shown = f"{measured / 60:>9.1f}m" if measured is not None else f"{'-':>10}"
        print(f"{name:<26}{tokens:>14,}{rate:>10.0f}{floor / 60:>8.1f}m{shown}")
    total = sum(row[3] for row in rows)
    print(f"floor of the benchmarks: {total / 60:.1f} min (target for the whole job: {TARGET_S / 60:.0f} min; "
          f"torch threads {threads}); measured eval_seconds of the five: "
          f"{sum(row[4] or 0 for row in rows) / 60:.1f} min")
    # the MMLU stage alone, through the original: its questions/s cannot pass its prompt tokens at that rate
    original_rate = next(row[2] for row in rows if row[0] == "original")
    mmlu_tokens = sum(map(len, data.mmlu_prompts))
    mmlu_ceiling = len(data.mmlu_prompts) / (mmlu_tokens / original_rate)
    print(f"MMLU through the original: at most {mmlu_ceiling:.1f} questions/s ({len(data.mmlu_prompts)} prompts, "
          f"{mmlu_tokens:,} tokens, linear layers alone)")
    if args.json:
        keys = ("name", "prompt_tokens", "tokens_per_s", "floor_s", "measured_s")
        write_json_atomic(args.json, {"rows": [dict(zip(keys, row)) for row in rows], "floor_s": total,
                                      "target_s": TARGET_S, "threads": threads,
                                      "mmlu_original_max_questions_per_s": mmlu_ceiling})


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
