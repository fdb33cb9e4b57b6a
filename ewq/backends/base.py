"""The evaluation interface every engine implements; every metric is written against it.

Token ids are produced once, by the Hugging Face tokenizer of the model under test, and
handed to the backend: every engine scores exactly the same tokens.
Implementations: hf.HFBackend (transformers, optionally with bitsandbytes modules) and
llamacpp.LlamaCppBackend (a GGUF file through the llama_cpp bindings).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..results.record import WeightsReport

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
    device: str

    @abstractmethod
    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        """Full-vocabulary log-softmax, float32, shape [len(tokens), vocab]: row i predicts token i+1."""

    def next_token_logprobs(self, tokens: list[int]) -> torch.Tensor:
        """Log-softmax over the vocabulary for the token after `tokens`."""
        return self.logprobs(tokens)[-1]

    @abstractmethod
    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """Exactly `max_new_tokens` greedy tokens (end-of-sequence does not stop decoding, so
        every variant does the same work); timed on the backend's device."""

    @abstractmethod
    def weights_report(self) -> WeightsReport:
        """What is really loaded, read back: bytes of weights, bits per weight, per-engine details."""

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device}
