"""llama.cpp backend, through the llama_cpp Python bindings (built from the same vendored source).

Token ids come from the Hugging Face tokenizer, as for every backend; no BOS is added by either.
Sequences are decoded one at a time through llama.cpp's batch API (llama_decode over the whole
sequence, n_ubatch 512), asking for logits only at the positions a metric reads: the scored rows of
a perplexity window, the last position of an MMLU prompt or a generation step. llama.cpp then runs
its output layer on those positions only, and the logits are read in place (no copy of a score
matrix per call). Flash attention is on, as llama.cpp's own tools choose by default where the
backend has it (16% faster prompt processing on our 2-core CPUs). On GPU every layer is offloaded
(n_gpu_layers=-1), split over the GPUs as --split-mode / --tensor-split say.
"""
from __future__ import annotations

import ctypes
import os
import time
import weakref

import numpy as np
import torch

from ..console import log
from ..errors import UserError
from ..results.record import WeightsReport
from .base import Backend, Generation

SPLIT_MODES = ("none", "layer", "row")


def _import_llama():
    try:
        import llama_cpp
    except ImportError as error:
        raise UserError(f"the llama_cpp Python bindings are not importable ({error}); run scripts/setup.sh") from None
    return llama_cpp


NO_CUDA = ("--device cuda, but llama.cpp was built without CUDA; build it with: EWQ_CUDA=1 bash scripts/setup.sh "
           "(one build for the tools and the bindings)")


def gguf_device(requested: str, resolved: str) -> str:
    """Where a GGUF runs: `resolved` (torch's answer to --device), except that --device auto on a GPU host
    whose llama.cpp was built without CUDA runs on the CPU (said in one line; the device is recorded and
    is not part of what pairs, so the KLD pairing with the original stays); --device cuda then fails."""
    if resolved != "cuda" or _import_llama().llama_supports_gpu_offload():
        return resolved
    if requested == "cuda":
        raise UserError(NO_CUDA)
    log("llama.cpp was built without CUDA: the GGUF runs on the CPU (EWQ_CUDA=1 bash scripts/setup.sh builds it "
        "with CUDA); its KLD still pairs with the original's")
    return "cpu"


class LlamaCppBackend(Backend):
    def __init__(self, gguf_path, device: str, name: str, n_ctx: int, weights_report: WeightsReport,
                 threads: int | None = None, split_mode: str = "layer", tensor_split: list[float] | None = None):
        llama_cpp = _import_llama()
        self._llama_cpp = llama_cpp
        self.device, self.name = device, name
        self.threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        self.n_ctx = n_ctx
        if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise UserError(NO_CUDA)
        self.split_mode, self.tensor_split = split_mode, tensor_split
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                                   logits_all=False, flash_attn=True, n_gpu_layers=-1 if device == "cuda" else 0,
                                   split_mode=getattr(llama_cpp, f"LLAMA_SPLIT_MODE_{split_mode.upper()}"),
                                   tensor_split=tensor_split,
                                   n_threads=self.threads, n_threads_batch=self.threads, verbose=False, seed=0)
        self._vocab = self.llm.n_vocab()
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        for i in range(n_ctx):  # every token belongs to sequence 0
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._weights_report = weights_report

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _array(self, pointer, ctype) -> np.ndarray:
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctype)), shape=(self.n_ctx,))

    def _check(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens exceed the llama.cpp context of {self.n_ctx}")

    def _decode(self, tokens: list[int], n_past: int, outputs: np.ndarray) -> np.ndarray:
        """Decode `tokens` at positions n_past.. of sequence 0; logits [len(outputs), vocab] at the
        indices `outputs` of `tokens` (a view into llama.cpp's buffer, valid until the next decode)."""
        self._check(n_past + len(tokens))
        n, batch = len(tokens), self._batch
        batch.n_tokens = n
        self._array(batch.token, ctypes.c_int32)[:n] = tokens
        self._array(batch.pos, ctypes.c_int32)[:n] = np.arange(n_past, n_past + n)
        wanted = self._array(batch.logits, ctypes.c_int8)
        wanted[:n] = 0
        wanted[outputs] = 1
        code = self._llama_cpp.llama_decode(self.llm.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        logits = self._llama_cpp.llama_get_logits(self.llm.ctx)
        return np.ctypeslib.as_array(logits, shape=(len(outputs), self._vocab))

    def _clear(self) -> None:
        self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self.llm.ctx), True)

    def _logits(self, tokens: list[int], outputs: np.ndarray) -> torch.Tensor:
        """One sequence from an empty cache: float32 logits [len(outputs), vocab] at `outputs`."""
        self._clear()
        return torch.from_numpy(self._decode(tokens, 0, outputs).copy())

    def window_logprobs(self, windows: list[list[int]], rows: slice) -> torch.Tensor:
        outputs = np.arange(len(windows[0]))[rows]
        return torch.stack([torch.log_softmax(self._logits(w, outputs), dim=-1) for w in windows])

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> torch.Tensor:
        return torch.stack([torch.log_softmax(self._logits(p, np.array([len(p) - 1])), dim=-1)[0, token_ids]
                            for p in prompts])

    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> Generation:
        self._check(len(prompt) + max_new_tokens)  # before the clock starts
        last = np.array([0])
        start = time.perf_counter()
        self._clear()
        token = int(np.argmax(self._decode(prompt, 0, np.array([len(prompt) - 1]))[0]))
        ttft = time.perf_counter() - start
        tokens = [token]
        for step in range(max_new_tokens - 1):
            token = int(np.argmax(self._decode([token], len(prompt) + step, last)[0]))
            tokens.append(token)
        return Generation(tokens=tokens, ttft_s=ttft, total_s=time.perf_counter() - start)

    def weights_report(self) -> WeightsReport:
        return self._weights_report

    def describe(self) -> dict:
        import llama_cpp

        out = {**super().describe(), "llama_cpp_python": llama_cpp.__version__, "n_ctx": self.n_ctx,
               "flash_attn": True, "threads": self.threads, "n_gpu_layers": -1 if self.device == "cuda" else 0}
        if self.device == "cuda":
            out.update(split_mode=self.split_mode, tensor_split=self.tensor_split)
        return out
