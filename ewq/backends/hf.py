"""Hugging Face transformers backend (fp16/fp32, or a plan applied through bitsandbytes)."""
from __future__ import annotations

import time

import torch

from ..errors import UserError
from ..results.record import WeightsReport
from .base import Backend, Generation


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    return requested


def compute_dtype(device: str) -> torch.dtype:
    """fp16 on GPU; fp32 on CPU, where fp16 matmuls are slow or missing."""
    return torch.float16 if device == "cuda" else torch.float32


def load_model(model_dir, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load {model_dir} as a causal LM: {str(error).splitlines()[0]}") from None
    return model.to(device).eval()


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer of {model_dir}: {str(error).splitlines()[0]}") from None


class HFBackend(Backend):
    def __init__(self, model, device: str, name: str, weights_report: WeightsReport):
        self.model, self.device, self.name = model, device, name
        self._weights_report = weights_report

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def logprobs(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    @torch.inference_mode()
    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> Generation:
        self._sync()
        start = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        past = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        self._sync()
        ttft = time.perf_counter() - start
        tokens = [token]
        for _ in range(max_new_tokens - 1):
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
        self._sync()
        return Generation(tokens=tokens, ttft_s=ttft, total_s=time.perf_counter() - start)

    def weights_report(self) -> WeightsReport:
        return self._weights_report


def dense_weights_report(model) -> WeightsReport:
    """Bytes and bits per weight of an unquantized model (shared tensors counted once)."""
    params = list(model.parameters())
    return WeightsReport(weight_bytes=sum(p.numel() * p.element_size() for p in params),
                         n_weights=sum(p.numel() for p in params),
                         details={"dtype": str(params[0].dtype).removeprefix("torch.")})
