"""The generation stage before and after batching its texts (issue 11), printed.

    python -m benchmarks.generation_cost [--model DIR] [--quick] [--decode-batch 4,8,16,32] [--plan PLAN]

On the full preset's requests (3 code, 3 math, 3 reasoning prompts and the offline summaries, 128
new tokens), the original model in float32 on the CPU (or, with --plan, the plan applied through
bitsandbytes as benchmark_ewq.py loads it), in this order:
- after: generation.evaluate() as the benchmarks run it: the first --timed-per-task requests of
  each task timed one at a time, then every request decoded in batches (HFBackend.greedy_tokens);
- before (unless --no-before): every request generated one at a time and timed (the old stage);
- the batched texts at each --decode-batch size.
Printed: seconds of each, decode tokens/s of both timed sets, and how many requests give the same
tokens batched as one at a time (all expected; differences would be floating-point near-ties).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def load(model_dir: Path, plan: Path | None):
    from ewq.backends import hf

    if plan is None:
        model = hf.load_model(model_dir, "cpu", torch.float32)
        return hf.HFBackend(model, "cpu", "original", hf.dense_weights_report(model), batch_size=None)
    from ewq import bnb_model, weights
    from ewq.plan.files import load_plan

    applied = load_plan(plan)
    model, not_applicable = bnb_model.load_quantized(weights.open_model(str(model_dir)), applied, "cpu",
                                                             torch.float32)
    return hf.HFBackend(model, "cpu", "ewq-bnb", bnb_model.read_back(model, applied, not_applicable),
                        batch_size=None)


def report(name: str, speed: dict, seconds: float) -> None:
    tps = speed["decode_tokens_per_s"]["per_request"]
    print(f"{name}: {seconds:.1f} s; decode {speed['decode_tokens_per_s']['value']:.2f} tok/s (per request "
          f"{tps['mean']:.2f} ± {tps['se']:.2f}, n={tps['n']}); ttft p50 {speed['ttft_s']['p50']:.3f} s")


def main(argv=None) -> None:
    from ewq import assets
    from ewq.backends import hf
    from ewq.bench import settings
    from ewq.bench.inputs import load_data
    from ewq.console import progress
    from ewq.metrics import generation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(assets.default_model()))
    parser.add_argument("--plan", type=Path, help="a quant_plan_<hash>.json: measure the bitsandbytes variant")
    parser.add_argument("--quick", action="store_true", help="the quick preset's requests (6, 32 new tokens)")
    parser.add_argument("--decode-batch", default="4,8,16,32", help="batch sizes of the texts to time ('' for none)")
    parser.add_argument("--no-before", action="store_true", help="leave out the one-at-a-time run (the longest)")
    args = parser.parse_args(argv)
    preset = settings.QUICK if args.quick else settings.FULL
    tokenizer = hf.load_tokenizer(args.model)
    data = load_data(tokenizer, settings.EvalSettings(device="cpu", **preset))
    backend = load(args.model, args.plan)
    prompts, n_new = data.request_prompts, preset["max_new_tokens"]
    print(f"{backend.name}, {len(prompts)} requests, {n_new} new tokens, torch threads {torch.get_num_threads()}")

    started = time.perf_counter()
    after = generation.evaluate(backend, tokenizer, data.requests, prompts, n_new, preset["timed_per_task"])
    report(f"after: {after['n_timed']} timed + every text batched by {backend.decode_batch_size}", after,
           time.perf_counter() - started)
    if not args.no_before:
        started = time.perf_counter()  # the stage until now: warm-up, then every request timed one at a time
        backend.generate_greedy(prompts[0], generation.WARMUP_TOKENS)
        runs = [backend.generate_greedy(prompt, n_new) for prompt in progress(prompts, desc="one at a time", unit="req")]
        report("before: every request timed, one at a time", generation.speed(runs, prompts),
               time.perf_counter() - started)
        same = sum(generation.visible_text(tokenizer, run.tokens) == output["text"]
                   for run, output in zip(runs, after["outputs"]))
        print(f"texts equal to one at a time: {same} of {len(prompts)}")
    for size in (int(x) for x in args.decode_batch.split(",") if x):
        backend.decode_batch_size = size
        started = time.perf_counter()
        backend.greedy_tokens(prompts, n_new)
        print(f"texts batched by {size}: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
