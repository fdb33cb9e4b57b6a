"""Sensitivity per tensor, measured end to end: the `kld` score's α_t.

For every ranked matrix t, the Hugging Face model runs with only t replaced by its round trip
through its reference type (its cheapest option, distortion.reference_type, quantized by
llama.cpp's own code with the importance matrix), on calibration windows of the
calibration-role text, never the evaluation text; the mean KLD(original ‖ perturbed) over every
token of the windows is ΔKLD_t(ref), and
    α_t = ΔKLD_t(ref) / e_t(ref),   predicted ΔKLD_t(q) = α_t · e_t(q)   for every other option q.
Cost: one forward pass per tensor and window. The output of every decoder layer is kept from the
unperturbed run and replayed for the layers before t's block, which only the perturbation
after them can change, so a tensor in block b runs the layers from b on (half of them on average).
The measurements are cached per model hash, importance matrix and calibration tokens in the
plans directory, saved after every tensor: an interrupted run, or a second plan at another
budget, goes on from what is there.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import assets
from ..console import log, progress
from ..data import wiki
from ..errors import UserError
from ..llamacpp.quantizers import ImportanceMatrix, round_trip
from ..llamacpp.types import LlamaType
from ..results.io import ensure_writable_dir, write_json_atomic
from .model import TensorEntry

CACHE_PREFIX = "kld_sensitivity_"


@dataclass(frozen=True)
class CalibrationSpec:
    windows: int  # non-overlapping windows of the calibration text
    context: int  # tokens per window; every token is scored


def calibration_tokens(tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """[windows, context] token ids from the calibration-role text."""
    ids = tokenizer.encode(wiki.calibration_text(assets.wiki_file()), add_special_tokens=False)
    need = spec.windows * spec.context
    if len(ids) < need:
        raise UserError(f"the calibration text has {len(ids)} tokens, fewer than {spec.windows} windows of "
                        f"{spec.context}; lower --calibration-windows")
    return torch.tensor(ids[:need]).reshape(spec.windows, spec.context)


def cache_path(cache_dir: Path, model_hash: str, imatrix_digest: str | None, tokens: torch.Tensor) -> Path:
    """One cache per model, importance matrix and calibration tokens."""
    key = hashlib.sha256(json.dumps([model_hash, imatrix_digest, tokens.tolist()]).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{CACHE_PREFIX}{model_hash}_{key}.json"


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList of decoder layers (as many as config.num_hidden_layers) and its name."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return name, module
    return None


class Replay:
    """Record every decoder layer's output on the unperturbed model; then, for a perturbation in
    block b, hand layers 0..b-1 their recorded output instead of running them."""

    def __init__(self, model: torch.nn.Module):
        found = decoder_layers(model)
        self.prefix, self.layers = found if found else ("", None)
        self.outputs: list[list] = []  # [window][layer] -> what the layer returned

    @contextmanager
    def recording(self):
        if self.layers is None:
            yield
            return
        current: list = []
        self.outputs.append(current)
        hooks = [layer.register_forward_hook(lambda module, args, output: current.append(output))
                 for layer in self.layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def first_block(self, entry: TensorEntry) -> int:
        """The first layer that must run when `entry` changes: its block, or 0 outside the layers."""
        inside = self.layers is not None and entry.block is not None and \
            entry.hf_name.startswith(f"{self.prefix}.{entry.block}.")
        return entry.block if inside else 0

    @contextmanager
    def skipping(self, window: int, first: int):
        for index in range(first):
            self.layers[index].forward = lambda *args, _out=self.outputs[window][index], **kwargs: _out
        try:
            yield
        finally:
            for index in range(first):
                del self.layers[index].forward


def swap_in_round_trip(model: torch.nn.Module, entry: TensorEntry, llama_type: LlamaType,
                       imatrix: ImportanceMatrix | None) -> torch.Tensor:
    """Replace the tensor's values in the model by their llama.cpp round trip; return the original values."""
    param = model.get_parameter(entry.hf_name)
    saved = param.data.clone()
    importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
    approx = round_trip(saved.float().cpu().numpy(), llama_type, importance)
    param.data.copy_(torch.from_numpy(np.ascontiguousarray(approx)).to(param.dtype))
    return saved


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), dim=-1)


def _kld(reference: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over tokens of KL(reference ‖ perturbed), both [tokens, vocab] log-probs."""
    return float((reference.exp() * (reference - log_probs)).sum(dim=-1).double().mean())


@torch.inference_mode()
def measure(model: torch.nn.Module, entries: list[TensorEntry], reference_types: dict[str, LlamaType],
            tokens: torch.Tensor, imatrix: ImportanceMatrix | None, done: dict[str, float],
            on_tensor: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """hf_name -> ΔKLD_t(reference type) for every entry; `done` holds those already measured."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    replay = Replay(model)
    references = []
    for window in range(tokens.shape[0]):
        with replay.recording():
            references.append(_log_probs(model, tokens[window]))
    kld = dict(done)
    todo = [e for e in entries if e.hf_name not in kld]
    for entry in progress(todo, desc="sensitivity", unit="tensor"):
        saved = swap_in_round_trip(model, entry, reference_types[entry.hf_name], imatrix)
        try:
            first = replay.first_block(entry)
            per_window = []
            for window, reference in enumerate(references):
                with replay.skipping(window, first):
                    per_window.append(_kld(reference, _log_probs(model, tokens[window])))
        finally:
            model.get_parameter(entry.hf_name).data.copy_(saved)
        kld[entry.hf_name] = sum(per_window) / len(per_window)
        if on_tensor is not None:
            on_tensor(kld)
    return kld


def measured_kld(model_dir: Path, model_hash: str, entries: list[TensorEntry],
                 reference_types: dict[str, LlamaType], imatrix: ImportanceMatrix | None,
                 imatrix_digest: str | None, spec: CalibrationSpec, cache_dir: Path, device: str) -> dict[str, float]:
    """ΔKLD_t(reference) for every entry, from the cache where measured, else measured (and cached)."""
    from ..backends import hf

    tokenizer = hf.load_tokenizer(model_dir)
    tokens = calibration_tokens(tokenizer, spec)
    path = cache_path(ensure_writable_dir(cache_dir), model_hash, imatrix_digest, tokens)
    fingerprint = {"model_hash": model_hash, "imatrix": imatrix_digest, "calibration": asdict(spec)}
    cached = _read_cache(path, fingerprint)
    done = {e.hf_name: cached[e.hf_name]["kld"] for e in entries
            if e.hf_name in cached and cached[e.hf_name]["reference_type"] == reference_types[e.hf_name]}
    if len(done) == len(entries):
        log(f"sensitivity: {len(done)} tensors from {path}")
        return done
    log(f"sensitivity: measuring {len(entries) - len(done)} tensors ({len(done)} cached) on {spec.windows} x "
        f"{spec.context} calibration tokens, {device}; cache {path}")
    model = hf.load_model(model_dir, device, torch.float32 if device == "cpu" else hf.compute_dtype(device))
    started = time.time()

    def save(kld: dict[str, float]) -> None:
        rows = {**cached, **{name: {"reference_type": reference_types[name].value, "kld": value}
                             for name, value in kld.items()}}
        write_json_atomic(path, {"fingerprint": fingerprint, "method": __doc__.strip(), "tensors": rows})

    kld = measure(model, entries, reference_types, tokens, imatrix, done, on_tensor=save)
    log(f"sensitivity: {len(entries) - len(done)} tensors measured in {time.time() - started:.0f} s")
    return kld


@torch.inference_mode()
def whole_plan_kld(model_dir: Path, entries: list[TensorEntry], imatrix: ImportanceMatrix | None,
                   spec: CalibrationSpec, device: str) -> float:
    """The KLD of the plan's GGUF types applied all at once, on the same calibration windows: how far
    the sum of single-tensor predictions is from the whole (additivity)."""
    from ..backends import hf

    tokens = calibration_tokens(hf.load_tokenizer(model_dir), spec)
    model = hf.load_model(model_dir, device, torch.float32 if device == "cpu" else hf.compute_dtype(device))
    tokens = tokens.to(next(model.parameters()).device)
    references = [_log_probs(model, window) for window in tokens]
    for entry in entries:
        swap_in_round_trip(model, entry, entry.llama_type, imatrix)
    return sum(_kld(reference, _log_probs(model, window)) for reference, window in zip(references, tokens)) / len(tokens)


def _read_cache(path: Path, fingerprint: dict) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        log(f"sensitivity: cache {path} is unreadable; measuring again")
        return {}
    return data.get("tensors", {}) if data.get("fingerprint") == fingerprint else {}
