"""Sensitivity per tensor, measured end to end: the `kld` score's α_t.

For every ranked matrix t, the Hugging Face model runs with only t replaced by its round trip
through its reference type (its cheapest option, distortion.reference_type, quantized by
llama.cpp's own code with the importance matrix), on calibration windows of the
calibration-role text, never the evaluation text; the mean KLD(original ‖ perturbed) over every
token of the windows is ΔKLD_t(ref), and
    α_t = ΔKLD_t(ref) / e_t(ref),   predicted ΔKLD_t(q) = α_t · e_t(q)   for every other option q.
Cheaper, for models too large to measure every tensor (`--sensitivity-band N`): one kind of tensor
over a band of N consecutive layers is one group, swapped at once, and its members share
    α_g = ΔKLD_g(ref) / Σ_{t∈g} e_t(ref)    (the additive model ΔKLD_g = Σ α_t e_t, one α per group).
Cost: one forward pass per group (or tensor) and window. The output of every decoder layer is kept
from the unperturbed run and replayed for the layers before the group's first block, which only
the perturbation after them can change, so a tensor in block b runs the layers from b on (half of
them on average). The measurements are cached per model hash, importance matrix and calibration
tokens in the plans directory, saved after every group: an interrupted run, or a second plan at
another budget, goes on from what is there.
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
from ..experts import ModelTensors
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


@dataclass(frozen=True)
class Group:
    """Tensors measured together: one tensor (its hf_name), or one kind of tensor over a band of layers."""
    name: str
    entries: tuple[TensorEntry, ...]


def groups_for(entries: list[TensorEntry], band: int | None) -> list[Group]:
    """Each entry alone (band None), or per tensor kind and band of `band` layers (blocks 0..band-1, ...);
    tensors outside the layers (embedding, head) stay alone."""
    if band is None:
        return [Group(e.hf_name, (e,)) for e in entries]
    members: dict[tuple[str, int], list[TensorEntry]] = {}
    for e in entries:
        key = (e.hf_name, -1) if e.block is None else (e.hf_name.replace(f".{e.block}.", ".{}.", 1), e.block // band)
        members.setdefault(key, []).append(e)
    groups = []
    for (kind, band_index), group in members.items():
        blocks = [e.block for e in group]
        name = kind if band_index < 0 else f"{kind}[{min(blocks)}-{max(blocks)}]"
        groups.append(Group(name, tuple(group)))
    return groups


def swap_in_round_trip(model: torch.nn.Module, entry: TensorEntry, llama_type: LlamaType,
                       imatrix: ImportanceMatrix | None) -> torch.Tensor:
    """Replace the tensor's values in the model (a stack of experts: every expert's) by their llama.cpp
    round trip; return the original values, for restore()."""
    tensors = ModelTensors(model)
    saved = tensors.values(entry)
    importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
    approx = round_trip(saved.float().cpu().numpy(), llama_type, importance)
    tensors.assign(entry, torch.from_numpy(np.ascontiguousarray(approx)))
    return saved


def restore(model: torch.nn.Module, entry: TensorEntry, saved: torch.Tensor) -> None:
    ModelTensors(model).assign(entry, saved)


@dataclass(frozen=True)
class Reference:
    """The unperturbed model's output on one window: logits and probabilities, [tokens, vocab] float32."""
    logits: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> "Reference":
        return cls(logits, torch.softmax(logits, dim=-1))


def window_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[tokens, vocab] float32 logits of one window of token ids."""
    return model(input_ids=ids[None], use_cache=False).logits[0].float()


def mean_kld(reference: Reference, logits: torch.Tensor, rows: int = 64) -> float:
    """Mean over tokens of KL(reference ‖ softmax(logits)), `rows` tokens at a time (they stay in cache).
    With d = logits − reference logits and p the reference probabilities, exactly
        KL = Σ p·(expm1(d) − d) + log1p(S) − S,   S = Σ p·expm1(d),
    which keeps its precision when the perturbation is small (no difference of two log-softmaxes);
    rows where expm1 overflows (a logit moved by > 88) fall back to the log-softmax form. The sums
    over the vocabulary run in float32 (torch's cascade summation), then S and KL in float64: within
    3e-6 of float64 sums at KL 5e-7 on 512 × 49,152 logits, a third of the time (the KLD was 40% of a
    measurement)."""
    total = 0.0
    for start in range(0, logits.shape[0], rows):
        p, ref, new = (x[start:start + rows] for x in (reference.probs, reference.logits, logits))
        d = new - ref
        e = torch.expm1(d)
        s = (p * e).sum(dim=-1).double()
        kl = (p * (e - d)).sum(dim=-1).double() + torch.log1p(s) - s
        if not torch.isfinite(kl).all():
            kl = (p * (torch.log_softmax(ref, dim=-1) - torch.log_softmax(new, dim=-1))).sum(dim=-1, dtype=torch.float64)
        total += float(kl.sum())
    return total / logits.shape[0]


@torch.inference_mode()
def measure(model: torch.nn.Module, groups: list[Group], reference_types: dict[str, LlamaType],
            tokens: torch.Tensor, imatrix: ImportanceMatrix | None, done: dict[str, float],
            on_group: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """group name -> ΔKLD_g(reference types), every member of the group swapped at once; `done` holds
    the groups already measured."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    replay = Replay(model)
    references = []
    for window in range(tokens.shape[0]):
        with replay.recording():
            references.append(Reference.of(window_logits(model, tokens[window])))
    kld = dict(done)
    todo = [g for g in groups if g.name not in kld]
    unit = "tensor" if all(len(g.entries) == 1 for g in todo) else "group"
    for group in progress(todo, desc="sensitivity", unit=unit):
        saved = [(e, swap_in_round_trip(model, e, reference_types[e.hf_name], imatrix)) for e in group.entries]
        try:
            first = min(replay.first_block(e) for e in group.entries)
            per_window = []
            for window, reference in enumerate(references):
                with replay.skipping(window, first):
                    per_window.append(mean_kld(reference, window_logits(model, tokens[window])))
        finally:
            for entry, values in saved:
                restore(model, entry, values)
        kld[group.name] = sum(per_window) / len(per_window)
        if on_group is not None:
            on_group(kld)
    return kld


def measured_kld(model_dir: Path, model_hash: str, groups: list[Group],
                 reference_types: dict[str, LlamaType], imatrix: ImportanceMatrix | None,
                 imatrix_digest: str | None, spec: CalibrationSpec, cache_dir: Path, device: str) -> dict[str, float]:
    """ΔKLD_g(reference types) for every group, from the cache where measured, else measured (and cached)."""
    from ..backends import hf

    tokenizer = hf.load_tokenizer(model_dir)
    tokens = calibration_tokens(tokenizer, spec)
    path = cache_path(ensure_writable_dir(cache_dir), model_hash, imatrix_digest, tokens)
    fingerprint = {"model_hash": model_hash, "imatrix": imatrix_digest, "calibration": asdict(spec)}
    cached = _read_cache(path, fingerprint)
    swapped = {g.name: {e.hf_name: reference_types[e.hf_name].value for e in g.entries} for g in groups}
    done = {g.name: cached[g.name]["kld"] for g in groups
            if g.name in cached and cached[g.name].get("reference_types") == swapped[g.name]}
    if len(done) == len(groups):
        log(f"sensitivity: {len(done)} groups/tensors from {path}")
        return done
    log(f"sensitivity: measuring {len(groups) - len(done)} groups/tensors ({len(done)} cached) on {spec.windows} x "
        f"{spec.context} calibration tokens, {device}; cache {path}")
    model = hf.load_model(model_dir, device, hf.compute_dtype(device, model_dir=model_dir))
    started = time.time()

    def save(kld: dict[str, float]) -> None:
        rows = {**cached, **{name: {"reference_types": swapped[name], "kld": value} for name, value in kld.items()}}
        write_json_atomic(path, {"fingerprint": fingerprint, "method": __doc__.strip(), "groups": rows})

    kld = measure(model, groups, reference_types, tokens, imatrix, done, on_group=save)
    log(f"sensitivity: {len(groups) - len(done)} groups/tensors measured in {time.time() - started:.0f} s")
    return kld


@torch.inference_mode()
def whole_plan_kld(model_dir: Path, entries: list[TensorEntry], imatrix: ImportanceMatrix | None,
                   spec: CalibrationSpec, device: str) -> float:
    """The KLD of the plan's GGUF types applied all at once, on the same calibration windows: how far
    the sum of single-tensor predictions is from the whole (additivity)."""
    from ..backends import hf

    tokens = calibration_tokens(hf.load_tokenizer(model_dir), spec)
    model = hf.load_model(model_dir, device, hf.compute_dtype(device, model_dir=model_dir))
    tokens = tokens.to(next(model.parameters()).device)
    references = [Reference.of(window_logits(model, window)) for window in tokens]
    for entry in entries:
        swap_in_round_trip(model, entry, entry.llama_type, imatrix)
    return sum(mean_kld(reference, window_logits(model, window))
               for reference, window in zip(references, tokens)) / len(tokens)


def _read_cache(path: Path, fingerprint: dict) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        log(f"sensitivity: cache {path} is unreadable; measuring again")
        return {}
    return data.get("groups", {}) if data.get("fingerprint") == fingerprint else {}
