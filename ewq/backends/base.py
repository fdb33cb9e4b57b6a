"""The evaluation interface every engine implements; every metric is written against it.

Token ids are produced once, by the Hugging Face tokenizer of the model under test, and
handed to the backend: every engine scores exactly the same tokens. Requests come in lists and
the backend batches them (`batch_size` sequences per scoring forward pass, `decode_batch_size`
sequences decoded together; with batch size "auto" it halves a batch on out-of-memory and goes
on). What a metric keeps is computed where the model runs: full-vocabulary rows stay on the
backend's device, and only the rows a metric needs are computed at all (the LM head runs at the
scored positions only).
Implementations: hf.HFBackend (transformers, optionally with bitsandbytes modules) and
llamacpp.LlamaCppBackend (a GGUF file through the llama_cpp bindings).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from ..console import log
from ..errors import UserError
from ..results.record import WeightsReport

Item = TypeVar("Item")


@dataclass(frozen=True)
class Generation:
    tokens: list[int]      # the max_new_tokens greedy tokens
    ttft_s: float          # prompt processing + first token
    total_s: float         # whole request

    @property
    def decode_s(self) -> float:
        return self.total_s - self.ttft_s


class Backend(ABC):
    """One loaded model."""

    name: str
    device: str            # where window_logprobs() leaves its rows ("cpu", "cuda", "cuda:1")
    batch_size: int = 1    # sequences per scoring forward pass (the current size when auto)
    decode_batch_size: int = 1  # sequences greedy_tokens() decodes together (likewise)
    auto_batch: bool = False

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Columns of every log-probability row."""

    @abstractmethod
    def window_logprobs(self, windows: list[list[int]], rows: slice) -> torch.Tensor:
        """Log-softmax over the vocabulary at positions `rows` of each window (row i predicts
        token i+1), float32 on `self.device`, shape [len(windows), len(rows), vocab].
        The windows have equal length; the LM head runs at `rows` only."""

    @abstractmethod
    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> torch.Tensor:
        """For each prompt, the log-softmax over the whole vocabulary of the token after it, read at
        `token_ids`: float32 on the host, shape [len(prompts), len(token_ids)]."""

    @abstractmethod
    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """Exactly `max_new_tokens` greedy tokens (end-of-sequence does not stop decoding, so
        every variant does the same work); batch 1, timed on the backend's device."""

    def greedy_tokens(self, prompts: list[list[int]], max_new_tokens: int,
                      decoded: dict[int, list[int]] | None = None) -> torch.Tensor:
        """The tokens generate_greedy() gives for each prompt, untimed: int64 on the host, shape
        [len(prompts), max_new_tokens]. Engines that can decode several sequences at once batch
        them; this one decodes one at a time, so it takes the tokens of prompts[i] from decoded[i]
        where generate_greedy() already gave them."""
        decoded = decoded or {}
        return torch.tensor([decoded[i] if i in decoded else self.generate_greedy(prompt, max_new_tokens).tokens
                             for i, prompt in enumerate(prompts)], dtype=torch.int64).reshape(len(prompts), -1)

    @abstractmethod
    def weights_report(self) -> WeightsReport:
        """What is really loaded, read back: bytes of weights, bits per weight, per-engine details."""

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "batch_size": self.batch_size,
                "decode_batch_size": self.decode_batch_size, "batch_size_auto": self.auto_batch}

    def in_batches(self, items: list[Item], run: Callable[[list[Item]], torch.Tensor],
                   size_of: str = "batch_size") -> torch.Tensor:
        """run() over consecutive batches of `batch_size` items (or of the attribute `size_of`
        names), concatenated along dim 0. With auto batching an out-of-memory error halves that
        size and the batch is tried again."""
        outputs, start = [], 0
        while start < len(items):
            size = getattr(self, size_of)
            try:
                outputs.append(run(items[start:start + size]))
            except torch.OutOfMemoryError:
                if not self.auto_batch or size == 1:
                    raise UserError(f"out of memory at batch size {size} on {self.device}: "
                                    "give a smaller --batch-size (or auto)") from None
                setattr(self, size_of, size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log(f"[{self.name}] out of memory at batch size {size}: now {size // 2}")
                continue
            start += size
        return torch.cat(outputs)

    def longest_first(self, prompts: list[list[int]], run: Callable[[list[int]], torch.Tensor],
                      size_of: str = "batch_size") -> torch.Tensor:
        """in_batches() over the prompts' indices sorted longest first (prompts of similar length
        share a batch, so little padding; with auto batching an out-of-memory error comes at the
        first batch); the rows come back in the caller's order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        rows = self.in_batches(order, run, size_of)
        out = torch.empty_like(rows)
        out[torch.tensor(order)] = rows
        return out
