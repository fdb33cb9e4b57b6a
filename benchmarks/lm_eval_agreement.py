"""Our MMLU answers against lm-evaluation-harness's, question by question (issue 11), printed.

    python -m benchmarks.lm_eval_agreement [--model DIR] [--per-subject 20] [--seed 1234] [--json OUT]

The questions are the benchmarks' own sample (stratified, seeded; the full preset takes 20 per
subject, 1,140 questions), 0-shot. lm-eval runs a local task built from the same questions with
the same prompt text (ewq.data.mmlu.prompt: the classic header, question, A-D choices, "Answer:"),
choices " A".." D" scored by log-likelihood (its `multiple_choice` output, metric acc), through its
hf backend in float32 on the CPU. Ours: ewq.metrics.mmlu through HFBackend, batched. Printed: the
answers that differ (none expected), the largest difference of a letter's log-likelihood, and
both accuracies with their SE and n.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ewq.errors import UserError

TASK = "ewq_mmlu_agreement"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def ours(model_dir: Path, questions, prompts_text: list[str]) -> torch.Tensor:
    """[n, 4] log-likelihoods of ' A'..' D' after each prompt, from our HF backend."""
    from ewq.backends import hf
    from ewq.metrics.mmlu import letter_token_ids
    from ewq.results.record import WeightsReport

    tokenizer = hf.load_tokenizer(model_dir)
    model = hf.load_model(model_dir, "cpu", torch.float32)
    backend = hf.HFBackend(model, "cpu", "ours", WeightsReport(0, 0), batch_size=None)
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in prompts_text]
    return backend.next_token_logprobs(prompts, letter_token_ids(tokenizer))


def theirs(model_dir: Path, questions, prompts_text: list[str], work: Path) -> torch.Tensor:
    """[n, 4] log-likelihoods of ' A'..' D' from lm-eval's hf backend on a local task."""
    try:
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise UserError(f"lm-evaluation-harness is not importable ({error}); pip install lm-eval") from None
    data = work / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": text, "answer": q.answer, "subject": q.subject}) + "\n"
                            for q, text in zip(questions, prompts_text)))
    (work / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    results = evaluator.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                                        tasks=[TASK], task_manager=TaskManager(include_path=str(work)), device="cpu",
                                        batch_size=8, log_samples=True, bootstrap_iters=0)
    scores = torch.empty(len(questions), 4, dtype=torch.float64)
    for sample in results["samples"][TASK]:
        scores[sample["doc_id"]] = torch.tensor([float(resp[0][0]) for resp in sample["resps"]])
    return scores


def main(argv=None) -> None:
    from ewq import assets
    from ewq.data import mmlu as mmlu_data
    from ewq.metrics.stats import proportion_se

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(assets.default_model()))
    parser.add_argument("--per-subject", type=int, default=20, help="MMLU questions per subject (full preset: 20)")
    parser.add_argument("--seed", type=int, default=1234, help="the benchmarks' --seed")
    parser.add_argument("--json", type=Path, help="also write the per-question comparison here")
    args = parser.parse_args(argv)
    questions = mmlu_data.stratified_sample(mmlu_data.load_questions(assets.mmlu_file()), args.per_subject, args.seed)
    prompts_text = [mmlu_data.prompt(q, []) for q in questions]
    mine = ours(args.model, questions, prompts_text).double()
    with tempfile.TemporaryDirectory() as work:
        other = theirs(args.model, questions, prompts_text, Path(work))
    ours_answer, their_answer = mine.argmax(1), other.argmax(1)
    differ = [i for i in range(len(questions)) if ours_answer[i] != their_answer[i]]
    truth = torch.tensor([q.answer for q in questions])
    gap = (mine - other).abs()
    margin = mine.sort(dim=1, descending=True).values
    print(f"model {args.model}; {len(questions)} MMLU questions ({args.per_subject} per subject, seed {args.seed}), 0-shot")
    print(f"answers that differ: {len(differ)} of {len(questions)}"
          + "".join(f"\n  question {i} ({questions[i].subject}): ours {'ABCD'[ours_answer[i]]}, lm-eval "
                    f"{'ABCD'[their_answer[i]]}, our top-2 margin {float(margin[i, 0] - margin[i, 1]):.2e}"
                    for i in differ))
    print(f"letter log-likelihoods: largest |ours - lm-eval| {float(gap.max()):.2e}, mean {float(gap.mean()):.2e}")
    for name, answer in (("ours", ours_answer), ("lm-eval", their_answer)):
        accuracy = proportion_se(int((answer == truth).sum()), len(questions))
        print(f"accuracy {name}: {100 * accuracy.mean:.2f}% ± {100 * accuracy.se:.2f} (n={accuracy.n})")
    if args.json:
        args.json.write_text(json.dumps({"n": len(questions), "differ": differ, "max_abs_gap": float(gap.max()),
                                         "ours": mine.tolist(), "lm_eval": other.tolist()}))


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
