"""Hugging Face transformers backend (the checkpoint's dtype on GPU, fp32 on CPU; or a plan applied
through bitsandbytes).

Batches are right-padded and sent without an attention mask: in a causal model a token's output
depends only on the tokens before it, so every real position sees exactly what it sees alone, with
the same position ids (0..n-1), whatever the architecture; the padded positions are never read.
The LM head runs only at the positions a metric reads: a forward pre-hook on the output embedding
gathers those hidden states, so whatever the model does after the head (Gemma's soft-capping,
Cohere's logit scale) still applies.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError
from ..results.record import WeightsReport
from .base import Backend, Generation

PAD_ID = 0  # never attended to by a real position (after it, or masked), so any id will do
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# first sizes tried with --batch-size auto (measured on CPU: README). Scoring is compute-bound on CPU,
# where batches gain little; decoding one token per sequence is bound by reading the weights, so
# sequences decoded together share that cost (the full preset's 26 texts: 69 s at 16, 268 s one at a time)
AUTO_BATCH = {"cpu": 4, "cuda": 64}
AUTO_DECODE_BATCH = {"cpu": 16, "cuda": 64}


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 -> "bfloat16" (the names of DTYPES, and of config.json's torch_dtype)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    return requested


def checkpoint_dtype(model_dir) -> torch.dtype | None:
    """The dtype the checkpoint's config.json names (`dtype`, or `torch_dtype` before transformers 5)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return DTYPES.get(dtype_name(name))


def compute_dtype(device: str, requested: str = "auto", model_dir=None) -> torch.dtype:
    """`requested` unless auto: then fp32 on CPU (fp16/bf16 matmuls are slow there), and on GPU the
    checkpoint's own dtype (bf16 stays bf16: bf16-trained models can overflow in fp16), fp16 if it names none."""
    if requested != "auto":
        return DTYPES[requested]
    if device == "cpu":
        return torch.float32
    return (checkpoint_dtype(model_dir) if model_dir is not None else None) or torch.float16


def load_model(model_dir, device: str, dtype: torch.dtype, device_map: str | None = None):
    """The model in `dtype`, on `device`, or spread by accelerate with `device_map` (auto, balanced, …). On a GPU
    the checkpoint's tensors go straight to it (transformers' device_map=device): an 8B model never sits in host
    RAM whole on its way there. On the host, float32 is reached by loading in the checkpoint's own dtype (its
    tensors then map the safetensors files, no copy) and widening, one tensor at a time: asked for
    float32 directly, transformers holds both the mapped bf16 file and the float32 copies at its peak (measured
    on a 1B bf16 Llama: 6.25 GiB peak against 5.26 GiB this way; same float32 weights bit for bit)."""
    from transformers import AutoModelForCausalLM

    direct = device_map or (None if torch.device(device).type == "cpu" else device)
    widen = direct is None and dtype == torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto" if widen else dtype, device_map=direct)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load {model_dir} as a causal LM: {str(error).splitlines()[0]}") from None
    if widen:
        model = model.to(torch.float32)
    return (model if direct else model.to(device)).eval()


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer of {model_dir}: {str(error).splitlines()[0]}") from None


def padded(batch: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [len(batch), longest] with PAD_ID after each sequence (or before it, `left`), and
    the mask of real tokens (1) of the same shape."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), PAD_ID)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, sequence in enumerate(batch):
        real = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, real] = torch.tensor(sequence)
        mask[row, real] = 1
    return ids, mask


def input_device(model) -> str:
    """Where input ids go: the device of the input embedding (the first one under a device map;
    accelerate's hooks bring the outputs back to it)."""
    return str(model.get_input_embeddings().weight.device)


class HFBackend(Backend):
    def __init__(self, model, device: str, name: str, weights_report: WeightsReport, batch_size: int | None = 1):
        """batch_size None: auto (AUTO_BATCH, AUTO_DECODE_BATCH for the device, halved on out-of-memory);
        a number is the size of both."""
        self.model, self.name = model, name
        self.device = input_device(model) if device.startswith("cuda") else device
        self.auto_batch = batch_size is None
        kind = "cpu" if self.device == "cpu" else "cuda"
        self.batch_size = batch_size or AUTO_BATCH[kind]
        self.decode_batch_size = batch_size or AUTO_DECODE_BATCH[kind]
        self._weights_report = weights_report
        self._lm_head = model.get_output_embeddings()
        if self._lm_head is None:
            raise UserError(f"{type(model).__name__} has no output embedding (LM head) to score with")

    @property
    def vocab_size(self) -> int:
        return self._lm_head.out_features

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @contextmanager
    def _lm_head_at(self, positions: torch.Tensor):
        """Within this block the LM head sees only the hidden states at `positions` [batch, k]."""
        def gather(module, args):
            hidden = args[0]  # [batch, length, hidden]
            index = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
            return (hidden.gather(1, index), *args[1:])

        handle = self._lm_head.register_forward_pre_hook(gather)
        try:
            yield
        finally:
            handle.remove()

    def _logits_at(self, ids: torch.Tensor, positions: torch.Tensor, **kwargs):
        """Model output with logits [batch, k, vocab] at `positions` [batch, k] of `ids` [batch, length]."""
        with self._lm_head_at(positions):
            out = self.model(input_ids=ids, **kwargs)
        if out.logits.shape[1] != positions.shape[1]:
            raise UserError(f"{type(self.model).__name__} does not call its LM head as a module; cannot score it")
        return out

    @torch.inference_mode()
    def window_logprobs(self, windows: list[list[int]], rows: slice) -> torch.Tensor:
        positions = torch.arange(len(windows[0]))[rows]

        def run(batch: list[list[int]]) -> torch.Tensor:
            ids = torch.tensor(batch, device=self.device)
            logits = self._logits_at(ids, positions.expand(len(batch), -1), use_cache=False).logits
            return torch.log_softmax(logits.float(), dim=-1).to(self.device)

        return self.in_batches(windows, run)

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> torch.Tensor:
        columns = torch.tensor(token_ids)

        def run(indices: list[int]) -> torch.Tensor:
            batch = [prompts[i] for i in indices]
            ids, _ = padded(batch)
            last = torch.tensor([[len(prompt) - 1] for prompt in batch])
            logits = self._logits_at(ids.to(self.device), last, use_cache=False).logits[:, 0]
            return torch.log_softmax(logits.float(), dim=-1)[:, columns.to(logits.device)].cpu()

        return self.longest_first(prompts, run)

    @torch.inference_mode()
    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> Generation:
        self._sync()
        start = time.perf_counter()
        out = self._logits_at(torch.tensor([prompt], device=self.device), torch.tensor([[len(prompt) - 1]]),
                              use_cache=True)
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

    @torch.inference_mode()
    def greedy_tokens(self, prompts: list[list[int]], max_new_tokens: int,
                      decoded: dict[int, list[int]] | None = None) -> torch.Tensor:
        """Batched greedy decoding, left-padded as transformers' generate() does: the attention mask
        hides the padding, position ids count real tokens only (0..n-1 for every prompt). Every
        prompt is decoded here (`decoded` is not used), so all texts come from one computation."""
        def run(indices: list[int]) -> torch.Tensor:
            ids, mask = (t.to(self.device) for t in padded([prompts[i] for i in indices], left=True))
            n, width = ids.shape
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, width]
            out = self._logits_at(ids, torch.full((n, 1), width - 1), attention_mask=mask,
                                  position_ids=positions, use_cache=True)
            tokens = [out.logits[:, -1].argmax(-1)]  # each [batch]
            for _ in range(max_new_tokens - 1):
                mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=tokens[-1][:, None].to(self.device), attention_mask=mask,
                                 position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
                tokens.append(out.logits[:, -1].argmax(-1))
            return torch.stack(tokens, dim=1).cpu()  # [batch, max_new_tokens]

        return self.longest_first(prompts, run, "decode_batch_size")

    def weights_report(self) -> WeightsReport:
        return self._weights_report

    def describe(self) -> dict:
        out = {**super().describe(), "dtype": dtype_name(next(self.model.parameters()).dtype)}
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map and len(set(device_map.values())) > 1:
            out["device_map"] = {str(k): str(v) for k, v in device_map.items()}
        return out


def dense_weights_report(model) -> WeightsReport:
    """Bytes and bits per weight of an unquantized model (shared tensors counted once)."""
    params = list(model.parameters())
    return WeightsReport(weight_bytes=sum(p.numel() * p.element_size() for p in params),
                         n_weights=sum(p.numel() for p in params),
                         details={"dtype": dtype_name(params[0].dtype)})
