"""Our MMLU answers against lm-evaluation-harness's, question by question (issue 11, issue 23), printed.

    python -m benchmarks.lm_eval_agreement [--model DIR] [--per-subject 20] [--seed 1234] [--json OUT]

The questions are the benchmarks' own sample (stratified, seeded; the full preset takes 20 per
subject, 1,140 questions), 0-shot. lm-eval runs **its own `mmlu` task definitions**: for each subject
a task that includes lm-eval's `tasks/mmlu/default/mmlu_<subject>.yaml` (its description, doc_to_text,
A-D choices, target delimiter and metric) and replaces only the dataset, cais/mmlu's schema (question,
subject, choices, answer) read from local files of the same questions (the hub is unreachable here);
through its hf backend in float32 on the CPU, which leaves special tokens to the tokenizer (a BOS
where it adds one). Ours: the benchmarks' prompts (ewq.bench.inputs.mmlu_inputs, the tokenizer's
own special tokens) through HFBackend, batched. Printed: the answers that differ (none expected),
the largest difference of a letter's log-likelihood, and both accuracies with their SE and n.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ewq.errors import UserError

TAG = "ewq_mmlu_agreement"
# lm-eval's own task for the subject, with the dataset alone replaced by the local questions
TASK_YAML = """include: {own}
task: {task}
tag: {tag}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
fewshot_split: null
fewshot_config: null
"""


def subject_task(subject: str) -> str:
    """lm-eval's name of a subject's task part: 'high school biology' -> 'high_school_biology'."""
    return subject.replace(" ", "_")


def ours(model_dir: Path, per_subject: int, seed: int):
    """(the questions, [n, 4] log-likelihoods of ' A'..' D' after each prompt, whether the prompts begin with
    the tokenizer's BOS) from the benchmarks' own MMLU inputs through our HF backend."""
    from ewq.backends import hf
    from ewq.bench.inputs import mmlu_inputs
    from ewq.bench.settings import QUICK, EvalSettings
    from ewq.metrics.mmlu import letter_token_ids
    from ewq.results.record import WeightsReport

    tokenizer = hf.load_tokenizer(model_dir)
    settings = EvalSettings(device="cpu", **{**QUICK, "mmlu_per_subject": per_subject, "seed": seed, "mmlu_shots": 0})
    questions, prompts = mmlu_inputs(tokenizer, settings)
    model = hf.load_model(model_dir, "cpu", torch.float32)
    backend = hf.HFBackend(model, "cpu", "ours", WeightsReport(0, 0), batch_size=None)
    bos = tokenizer.bos_token_id is not None and all(p[0] == tokenizer.bos_token_id for p in prompts)
    return questions, backend.next_token_logprobs(prompts, letter_token_ids(tokenizer)), bos


def lm_eval_task_dir() -> Path:
    """lm-eval's own MMLU task definitions (0-shot, the `default` variant)."""
    try:
        import lm_eval.tasks
    except ImportError as error:
        raise UserError(f"lm-evaluation-harness is not importable ({error}); pip install lm-eval") from None
    folder = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    if not (folder / "_default_template_yaml").is_file():
        raise UserError(f"lm-eval's mmlu task definitions are not in {folder}")
    return folder


def theirs(model_dir: Path, questions, work: Path) -> torch.Tensor:
    """[n, 4] log-likelihoods of ' A'..' D' from lm-eval's hf backend on its own mmlu tasks (module doc)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    own = lm_eval_task_dir()
    by_subject: dict[str, list[int]] = {}
    for index, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(index)
    for subject, indices in by_subject.items():
        name = subject_task(subject)
        if not (own / f"mmlu_{name}.yaml").is_file():
            raise UserError(f"lm-eval has no mmlu task for subject {subject!r} ({own / f'mmlu_{name}.yaml'})")
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": questions[i].question, "subject": name,
                                            "choices": list(questions[i].choices), "answer": questions[i].answer}) + "\n"
                                for i in indices))
        (work / f"ewq_mmlu_{name}.yaml").write_text(TASK_YAML.format(own=own / f"mmlu_{name}.yaml", data=data,
                                                                     task=f"ewq_mmlu_{name}", tag=TAG))
    results = evaluator.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                                        tasks=[TAG], task_manager=TaskManager(include_path=str(work)), device="cpu",
                                        batch_size=8, log_samples=True, bootstrap_iters=0, num_fewshot=0)
    scores = torch.full((len(questions), 4), float("nan"), dtype=torch.float64)
    for subject, indices in by_subject.items():
        for sample in results["samples"][f"ewq_mmlu_{subject_task(subject)}"]:
            scores[indices[sample["doc_id"]]] = torch.tensor([float(resp[0][0]) for resp in sample["resps"]])
    if torch.isnan(scores).any():
        raise UserError(f"lm-eval scored {int((~torch.isnan(scores[:, 0])).sum())} of {len(questions)} questions")
    return scores


def main(argv=None) -> None:
    from ewq import assets
    from ewq.metrics.stats import proportion_se

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(assets.default_model()))
    parser.add_argument("--per-subject", type=int, default=20, help="MMLU questions per subject (full preset: 20)")
    parser.add_argument("--seed", type=int, default=1234, help="the benchmarks' --seed")
    parser.add_argument("--json", type=Path, help="also write the per-question comparison here")
    args = parser.parse_args(argv)
    questions, mine, bos = ours(args.model, args.per_subject, args.seed)
    mine = mine.double()
    with tempfile.TemporaryDirectory() as work:
        other = theirs(args.model, questions, Path(work))
    ours_answer, their_answer = mine.argmax(1), other.argmax(1)
    differ = [i for i in range(len(questions)) if ours_answer[i] != their_answer[i]]
    truth = torch.tensor([q.answer for q in questions])
    gap = (mine - other).abs()
    margin = mine.sort(dim=1, descending=True).values
    print(f"model {args.model}; {len(questions)} MMLU questions ({args.per_subject} per subject, seed {args.seed}), 0-shot, lm-eval's "
          f"own mmlu tasks; the tokenizer {'adds a BOS to every prompt' if bos else 'adds no BOS'}")
    print(f"answers that differ: {len(differ)} of {len(questions)}"
          + "".join(f"\n  question {i} ({questions[i].subject}): ours {'ABCD'[ours_answer[i]]}, lm-eval "
                    f"{'ABCD'[their_answer[i]]}, our top-2 margin {float(margin[i, 0] - margin[i, 1]):.2e}"
                    for i in differ))
    print(f"letter log-likelihoods: largest |ours - lm-eval| {float(gap.max()):.2e}, mean {float(gap.mean()):.2e}")
    for name, answer in (("ours", ours_answer), ("lm-eval", their_answer)):
        accuracy = proportion_se(int((answer == truth).sum()), len(questions))
        print(f"accuracy {name}: {100 * accuracy.mean:.2f}% ± {100 * accuracy.se:.2f} (n={accuracy.n})")
    if args.json:
        args.json.write_text(json.dumps({"n": len(questions), "bos": bos, "differ": differ, "max_abs_gap": float(gap.max()),
                                         "ours": mine.tolist(), "lm_eval": other.tolist()}))


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
