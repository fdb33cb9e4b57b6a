"""The MMLU stage of the Hugging Face backend before and after batched scoring (issue 11), printed.

    python -m benchmarks.mmlu_cost [--model DIR] [--per-subject 20] [--seed 1234] [--rounds 1]

On the benchmarks' own MMLU sample (stratified, seeded; the full preset takes 20 per subject, 1,140
questions, 0-shot), the original model in float32 on the CPU, in one process:
- before: the scoring as it was before issue 11, one question at a time: the LM head and the
  log-softmax over the whole vocabulary at every position of the prompt, then 4 numbers read;
- after: HFBackend.next_token_logprobs as the MMLU stage calls it (chunks of 50 questions on CPU, each
  sorted longest first and batched by --batch-size auto; the LM head at the last position only).
The two alternate for --rounds rounds (before, after, before, ...), so that a slower spell of a
shared machine falls on both. Printed: questions/s of each round and of each path over all rounds,
the ratio, and how many questions get a different answer (none expected) with the largest
difference of a letter's log-probability.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


@torch.inference_mode()
def before(model, prompts: list[list[int]], letter_ids: list[int]) -> torch.Tensor:
    """[n, 4]: the scoring before issue 11 (full-vocabulary log-softmax at every position, batch 1)."""
    rows = []
    for prompt in prompts:
        logits = model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0]  # [length, vocab]
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu()[-1, letter_ids])
    return torch.stack(rows)


def after(backend, prompts: list[list[int]], letter_ids: list[int]) -> torch.Tensor:
    """[n, 4]: the MMLU stage's calls today (chunks as ewq.metrics.mmlu.evaluate sends them)."""
    from ewq.metrics.mmlu import chunk_size

    chunk = chunk_size(backend)
    return torch.cat([backend.next_token_logprobs(prompts[i:i + chunk], letter_ids)
                      for i in range(0, len(prompts), chunk)])


def timed(function, *args) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = function(*args)
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    from ewq import assets
    from ewq.backends import hf
    from ewq.bench.inputs import mmlu_inputs
    from ewq.bench.settings import FULL, EvalSettings
    from ewq.commands.common import Parser, positive_int
    from ewq.metrics.mmlu import letter_token_ids

    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(assets.default_model()), help="default: the embedded model")
    parser.add_argument("--per-subject", type=positive_int, default=FULL["mmlu_per_subject"],
                        help="questions per subject (default: the full preset's, %(default)s)")
    parser.add_argument("--seed", type=int, default=FULL["seed"], help="seed of the sample (default: the presets', %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=1, help="times each path runs, alternating")
    args = parser.parse_args(argv)
    tokenizer = hf.load_tokenizer(args.model)
    eval_settings = EvalSettings(device="cpu", **dict(FULL, mmlu_per_subject=args.per_subject, seed=args.seed))
    _, prompts = mmlu_inputs(tokenizer, eval_settings)  # the full preset's prompts (0-shot)
    letter_ids = letter_token_ids(tokenizer)
    model = hf.load_model(args.model, "cpu", torch.float32)
    backend = hf.HFBackend(model, "cpu", "after", hf.dense_weights_report(model), batch_size=None)
    n = len(prompts)
    print(f"{n} questions, {sum(map(len, prompts)):,} prompt tokens, torch threads {torch.get_num_threads()}, "
          f"batch {backend.batch_size} after")
    seconds = {"before": 0.0, "after": 0.0}
    for round_ in range(1, args.rounds + 1):
        old, old_s = timed(before, model, prompts, letter_ids)
        new, new_s = timed(after, backend, prompts, letter_ids)
        seconds["before"] += old_s
        seconds["after"] += new_s
        print(f"round {round_}: before {n / old_s:.2f} q/s ({old_s:.0f} s), after {n / new_s:.2f} q/s ({new_s:.0f} s)")
    differ = int((old.argmax(1) != new.argmax(1)).sum())
    print(f"before {n * args.rounds / seconds['before']:.2f} q/s, after {n * args.rounds / seconds['after']:.2f} q/s: "
          f"{seconds['before'] / seconds['after']:.2f}x; answers that differ: {differ} of {n}; largest difference "
          f"of a letter's log-probability {float((old - new).abs().max()):.2e}")


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
