"""Greedy generation on the four tasks: speed, latency, and text quality.

Each request decodes exactly max_new_tokens (end-of-sequence does not stop the loop) so that
every variant does identical work; the text used for quality is cut at the first EOS token.
Two passes over the same requests:
- speed: the first `timed_per_task` requests of each task, one at a time (a user's single
  request), after one warm-up request. Decode throughput = (tokens after the first) / (time after
  the first token), summed over the timed requests; time to first token and latency per request.
- quality: every request, through the backend's batched greedy decoding (greedy_tokens(): the same
  tokens as one at a time, within floating point; an engine that decodes one at a time reuses the
  timed requests' tokens), for BLEU/ROUGE and ROUGE-L vs the original.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Sequence

from ..backends.base import Backend, Generation
from ..console import log, progress
from ..data.prompts import Request, Task
from . import textsim
from .stats import mean_se, percentile

WARMUP_TOKENS = 8


def prompt_tokens(tokenizer, request: Request) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": request.prompt}],
                                             add_generation_prompt=True, tokenize=False)
    else:
        text = request.prompt
    return tokenizer.encode(text, add_special_tokens=False)


def visible_text(tokenizer, tokens: list[int]) -> str:
    eos = tokenizer.eos_token_id
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _spread(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": mean_se(values).mean, "n": len(values)}


def timed_indices(requests: list[Request], per_task: int) -> list[int]:
    """The first `per_task` requests of each task, in request order."""
    seen: dict[str, int] = {}
    out = []
    for index, request in enumerate(requests):
        seen[request.task] = seen.get(request.task, 0) + 1
        if seen[request.task] <= per_task:
            out.append(index)
    return out


def speed(runs: list[Generation], prompts: list[list[int]]) -> dict:
    """Speed figures of requests generated one at a time (`prompts[i]` gave `runs[i]`)."""
    decode_tokens = sum(len(r.tokens) - 1 for r in runs)
    decode_time = sum(r.decode_s for r in runs)
    per_request_tps = [(len(r.tokens) - 1) / r.decode_s for r in runs if r.decode_s > 0]
    return {
        "n_timed": len(runs),
        "prompt_tokens": _spread([float(len(p)) for p in prompts]),
        "decode_tokens_per_s": {"value": decode_tokens / decode_time if decode_time > 0 else None,
                                "per_request": mean_se(per_request_tps).to_json()},
        "ttft_s": _spread([r.ttft_s for r in runs]),
        "latency_s": _spread([r.total_s for r in runs]),
    }


def evaluate(backend: Backend, tokenizer, requests: list[Request], prompts: list[list[int]], max_new_tokens: int,
             timed_per_task: int, reference_outputs: list[str] | None = None, done: Sequence[dict] = (),
             on_progress: Callable[[list[dict]], None] | None = None) -> dict:
    """`prompts[i]` holds the token ids of prompt_tokens() for `requests[i]`. `done` holds the timed
    generations of an interrupted run (dicts: the request's index and the Generation's fields), kept
    while they are those of the first timed requests; `on_progress` gets all timed generations after
    each one."""
    timed = timed_indices(requests, timed_per_task)
    backend.generate_greedy(prompts[timed[0]], WARMUP_TOKENS)  # first-call costs (allocations, kernels) stay out
    runs: list[Generation] = []
    for index, item in zip(timed, done):
        if item.get("request") != index:  # not this run's (an older layout without indices): decode again
            break
        runs.append(Generation(**{k: v for k, v in item.items() if k != "request"}))
    for index in progress(timed[len(runs):], desc=f"generation, timed [{backend.name}]", unit="req"):
        runs.append(backend.generate_greedy(prompts[index], max_new_tokens))
        if on_progress is not None:
            on_progress([{"request": i, **asdict(r)} for i, r in zip(timed, runs)])
    log(f"generation [{backend.name}]: {len(prompts)} requests, batches of up to {backend.decode_batch_size}")
    decoded = {index: run.tokens for index, run in zip(timed, runs)}
    tokens = backend.greedy_tokens(prompts, max_new_tokens, decoded)  # [requests, max_new_tokens]
    outputs = [visible_text(tokenizer, row) for row in tokens.tolist()]
    result = {"max_new_tokens": max_new_tokens, "n_requests": len(requests),
              **speed(runs, [prompts[i] for i in timed]),
              "outputs": [{"task": r.task, "text": text} for r, text in zip(requests, outputs)]}
    summaries = [(text, r.reference) for r, text in zip(requests, outputs) if r.task == Task.SUMMARIZATION]
    if summaries:
        hypotheses, references = [h for h, _ in summaries], [ref for _, ref in summaries]
        result["summarization"] = {"bleu": textsim.bleu(hypotheses, references),
                                   "rouge": textsim.rouge(hypotheses, references)}
    if reference_outputs is not None:
        if len(reference_outputs) != len(outputs):
            raise ValueError("the original's outputs are for other requests")
        result["rougeL_vs_original"] = textsim.rouge(outputs, reference_outputs)["rougeL"]
    return result
