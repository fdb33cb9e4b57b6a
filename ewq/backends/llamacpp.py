"""llama.cpp backend, through the llama_cpp Python bindings (built from the same vendored source).

Token ids come from the Hugging Face tokenizer, as for every backend; no BOS is added by either.
The context holds `n_ctx` tokens with logits kept for every position (logits_all), which the
full-vocabulary metrics need. On GPU every layer is offloaded (n_gpu_layers=-1).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..errors import UserError
from ..results.record import WeightsReport
from .base import Backend, Generation


def _import_llama():
    try:
        import llama_cpp
    except ImportError as error:
        raise UserError(f"the llama_cpp Python bindings are not importable ({error}); run scripts/setup.sh") from None
    return llama_cpp


class LlamaCppBackend(Backend):
    def __init__(self, gguf_path, device: str, name: str, n_ctx: int, weights_report: WeightsReport,
                 threads: int | None = None):
        llama_cpp = _import_llama()
        self.device, self.name = device, name
        self.threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        self.n_ctx = n_ctx
        if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise UserError("--device cuda, but these llama_cpp bindings were built without GPU offload "
                            "(reinstall with CMAKE_ARGS=-DGGML_CUDA=on)")
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                                   logits_all=True, n_gpu_layers=-1 if device == "cuda" else 0,
                                   n_threads=self.threads, n_threads_batch=self.threads, verbose=False, seed=0)
        self._weights_report = weights_report

    def _check(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens exceed the llama.cpp context of {self.n_ctx}")

    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        self._check(len(tokens))
        self.llm.reset()
        self.llm.eval(tokens)
        logits = torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))
        return torch.log_softmax(logits, dim=-1)

    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> Generation:
        self._check(len(prompt) + max_new_tokens)
        start = time.perf_counter()
        self.llm.reset()
        self.llm.eval(prompt)
        token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        ttft = time.perf_counter() - start
        tokens = [token]
        for _ in range(max_new_tokens - 1):
            self.llm.eval([token])
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            tokens.append(token)
        return Generation(tokens=tokens, ttft_s=ttft, total_s=time.perf_counter() - start)

    def weights_report(self) -> WeightsReport:
        return self._weights_report

    def describe(self) -> dict:
        import llama_cpp

        return {**super().describe(), "llama_cpp_python": llama_cpp.__version__, "n_ctx": self.n_ctx,
                "threads": self.threads, "n_gpu_layers": -1 if self.device == "cuda" else 0}
