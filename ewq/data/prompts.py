"""Generation requests: the seeds' four tasks (code, math, summarization, reasoning).

Summarization is scored against references, from one of two sources (--summaries-from):
- wiki (offline, the default): derived from the shipped Wikipedia text: source = the first
  SOURCE_WORDS words of an article's body (everything after the lead), reference = the first
  REFERENCE_SENTENCES sentences of that article's lead, which Wikipedia writes as a summary of
  the article. Only "summarization"-role articles are used, so none of this text is perplexity text.
- billsum (the hub, or a local table in its schema, data/hub.py): the standard set the original
  studies used; source = the first SOURCE_WORDS words of the bill, reference = its summary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from . import hub, wiki

SOURCE_WORDS = 300
REFERENCE_SENTENCES = 2
WIKI = "wiki"  # the offline summarization items


class Task(StrEnum):
    """What a generation request asks for (a request's `task`, a key of the generation metrics)."""
    CODE = "code"
    MATH = "math"
    SUMMARIZATION = "summarization"
    REASONING = "reasoning"


@dataclass(frozen=True)
class Request:
    task: Task
    prompt: str  # user message; chat-formatted by the backend's tokenizer when it has a template
    reference: str | None = None


CODE_PROMPTS = (
    "Write a Python function `is_prime(n)` that returns True when n is a prime number.",
    "Write a Python function that reverses the words of a sentence, keeping their order of letters.",
    "Write a Python function `fib(n)` that returns the n-th Fibonacci number using iteration.",
)
MATH_PROMPTS = (
    "A shop sells pencils at 3 for 45 cents. How much do 12 pencils cost? Explain step by step.",
    "Solve for x: 4x + 7 = 31. Show your steps.",
    "A train travels 180 km in 2 hours and 30 minutes. What is its average speed in km/h?",
)
REASONING_PROMPTS = (
    "All roses are flowers. Some flowers fade quickly. Can we conclude that some roses fade quickly? Explain.",
    "Tom is taller than Ann. Ann is taller than Ben. Who is the shortest? Explain your reasoning.",
    "If it rains, the ground gets wet. The ground is wet. Did it necessarily rain? Explain.",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def first_sentences(text: str, count: int) -> str:
    return " ".join(_SENTENCE_END.split(text.replace("\n", " "))[:count]).strip()


def summarization_requests(wiki_path: Path) -> list[Request]:
    requests = []
    for article in wiki.articles_for(wiki_path, "summarization"):
        source = " ".join(article.body.split()[:SOURCE_WORDS])
        reference = first_sentences(article.lead, REFERENCE_SENTENCES)
        if len(source.split()) < SOURCE_WORDS // 2 or not reference:
            continue
        requests.append(_summarize(source, reference))
    return requests


def _summarize(source_text: str, reference: str) -> Request:
    source = " ".join(source_text.split()[:SOURCE_WORDS])
    return Request(Task.SUMMARIZATION, f"Summarize the following text in two sentences.\n\n{source}", reference)


def hub_summarization_requests(source: str, limit: int) -> list[Request]:
    """The first `limit` items of billsum (by name, or a local table with its columns)."""
    return [_summarize(row["text"], row["summary"].strip()) for row in hub.rows(hub.BILLSUM, source)[:limit]
            if row["text"].strip() and row["summary"].strip()]


def generation_requests(wiki_path: Path, per_task: int, summaries: int, summaries_from: str = WIKI) -> list[Request]:
    """`per_task` prompts of code, math and reasoning, and `summaries` summarization items from
    `summaries_from` (WIKI, "billsum", or a local table in billsum's schema)."""
    fixed = [(Task.CODE, CODE_PROMPTS), (Task.MATH, MATH_PROMPTS), (Task.REASONING, REASONING_PROMPTS)]
    requests = [Request(task, text) for task, prompts in fixed for text in prompts[:per_task]]
    if summaries == 0:
        return requests
    if summaries_from == WIKI:
        return requests + summarization_requests(wiki_path)[:summaries]
    return requests + hub_summarization_requests(summaries_from, summaries)
