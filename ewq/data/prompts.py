"""Generation requests: the seeds' four tasks (code, math, summarization, reasoning).

Summarization is scored against references derived from the shipped Wikipedia text:
source = the first SOURCE_WORDS words of an article's body (everything after the lead),
reference = the first REFERENCE_SENTENCES sentences of that article's lead, which
Wikipedia writes as a summary of the article. Only "summarization"-role articles are used,
so none of this text is perplexity text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import wiki

SOURCE_WORDS = 300
REFERENCE_SENTENCES = 2


class Task:
    CODE, MATH, SUMMARIZATION, REASONING = "code", "math", "summarization", "reasoning"
    ALL = (CODE, MATH, SUMMARIZATION, REASONING)


@dataclass(frozen=True)
class Request:
    task: str
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
        prompt = f"Summarize the following text in two sentences.\n\n{source}"
        requests.append(Request(Task.SUMMARIZATION, prompt, reference))
    return requests


def generation_requests(wiki_path: Path, per_task: int, summaries: int) -> list[Request]:
    """`per_task` prompts of code, math and reasoning, and `summaries` summarization items."""
    fixed = [(Task.CODE, CODE_PROMPTS), (Task.MATH, MATH_PROMPTS), (Task.REASONING, REASONING_PROMPTS)]
    requests = [Request(task, text) for task, prompts in fixed for text in prompts[:per_task]]
    return requests + summarization_requests(wiki_path)[:summaries]
