"""MMLU accuracy from the log-likelihood of the answer letter (' A' .. ' D') after the prompt."""
from __future__ import annotations

from typing import Callable, Sequence

from ..backends.base import Backend
from ..console import progress
from ..data import mmlu
from ..errors import UserError
from .stats import proportion_se


def letter_token_ids(tokenizer) -> list[int]:
    ids = []
    for letter in mmlu.LETTERS:
        encoded = tokenizer.encode(f" {letter}", add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"the tokenizer splits ' {letter}' into {len(encoded)} tokens; MMLU scoring needs one")
        ids.append(encoded[0])
    return ids


def chunk_size(backend: Backend, every: int = 50) -> int:
    """Questions per backend call: several batches (the backend sorts a chunk by length), at least
    `every` (progress is saved after each chunk)."""
    return max(every, 4 * backend.batch_size)


def evaluate(backend: Backend, tokenizer, sample: list[mmlu.Question], prompts: list[list[int]],
             done: Sequence[int] = (), on_progress: Callable[[list[int]], None] | None = None,
             every: int = 50) -> dict:
    """`prompts[i]` holds the token ids of mmlu.prompt() for `sample[i]`. `done` holds the results
    of the first questions from an interrupted run; `on_progress` gets all results after each chunk
    of at least `every` questions."""
    letter_ids = letter_token_ids(tokenizer)
    correct = list(done)
    bar = progress(total=len(sample), initial=len(correct), desc=f"mmlu [{backend.name}]", unit="q")
    while len(correct) < len(sample):
        chunk = slice(len(correct), len(correct) + chunk_size(backend, every))
        scores = backend.next_token_logprobs(prompts[chunk], letter_ids)  # [chunk, 4]
        correct.extend(int(int(row.argmax()) == question.answer) for row, question in zip(scores, sample[chunk]))
        bar.update(len(scores))
        if on_progress is not None:
            on_progress(correct)
    bar.close()
    by_subject: dict[str, list[int]] = {}
    for question, hit in zip(sample, correct):
        by_subject.setdefault(question.subject, []).append(hit)
    return {
        "accuracy": proportion_se(sum(correct), len(correct)).to_json(),
        "per_subject": {s: proportion_se(sum(v), len(v)).to_json() for s, v in sorted(by_subject.items())},
        "per_question_correct": correct,
    }
