"""Distortion per tensor and type: exact bytes and the measured relative error of every option.

For the `kld` score every matrix may take any llama.cpp type of its menu (quant_types.gguf_menu:
Q3_K … Q8_0 and F16, the legacy Q4_0/Q4_1/Q5_0/Q5_1 and IQ4_NL/IQ4_XS, where their blocks divide
its rows), and any bitsandbytes precision (quant_types.BNB_MENU). For each option this module gives
  bytes   exactly as written: rows × row bytes (llama-quantize), or bitsandbytes' storage;
  error   e_t(q) = Σⱼ aⱼ Σᵢ (wᵢⱼ−qᵢⱼ)² / Σⱼ aⱼ Σᵢ wᵢⱼ², aⱼ the importance of input column j (1 without
          an importance matrix), from llama.cpp's own quantizer and bitsandbytes' own round trip.
The predicted ΔKLD of an option is α_t · e_t(q), α_t measured per tensor (ewq.sensitivity, scores.py).

The errors are a reusable measurement (DistortionCache): one file per model hash and importance matrix in
the plans directory, so that a plan at another budget, or by another score, quantizes nothing again. It is
written after a plan's decision only (a refused budget leaves nothing behind); a tensor whose cached
options are not its menu of today is measured again.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..console import log
from ..fileio import ensure_writable_dir, read_cache, write_json_atomic
from ..llamacpp.quantizers import ImportanceMatrix, round_trip, weighted_error
from ..quant_types import BNB_MENU, NF4_BLOCKSIZE, LlamaType, Precision, bnb_bits, gguf_menu
from .entries import TensorEntry


def gguf_bytes(entry: TensorEntry, llama_type: LlamaType) -> int:
    rows = entry.numel // entry.ncols
    return rows * llama_type.row_bytes(entry.ncols)


def bnb_bytes(entry: TensorEntry, precision: Precision) -> int:
    return round(entry.numel * bnb_bits(precision, entry.ncols) / 8)


def gguf_errors(entry: TensorEntry, values: np.ndarray, imatrix: ImportanceMatrix | None) -> dict[LlamaType, float]:
    """e_t(q) for every option, the types quantized on as many threads as there are cores (llama.cpp's
    quantizer runs outside the GIL)."""
    importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
    options = gguf_menu(entry.ncols)

    def error(llama_type: LlamaType) -> float:
        return weighted_error(values, round_trip(values, llama_type, importance), importance)

    with ThreadPoolExecutor(max_workers=min(len(options), os.cpu_count() or 1)) as pool:
        return dict(zip(options, pool.map(error, options)))


def bnb_round_trip(values: torch.Tensor, precision: Precision) -> torch.Tensor:
    """What bitsandbytes' kernels see after quantizing a [rows, cols] matrix, as float32: nf4 in blocks
    of 64 with double-quantized absmax (Linear4bit), or int8 with one absmax per row (Linear8bitLt)."""
    import bitsandbytes.functional as F

    if precision is Precision.FP16:
        return values.to(torch.float16).float()
    if precision is Precision.INT4:
        packed, state = F.quantize_4bit(values.contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                        compress_statistics=True)
        return F.dequantize_4bit(packed, state).float()
    quantized, row_absmax, _ = F.int8_vectorwise_quant(values.contiguous())
    return F.int8_vectorwise_dequant(quantized, row_absmax).float()


def bnb_errors(entry: TensorEntry, values: torch.Tensor, imatrix: ImportanceMatrix | None) -> dict[Precision, float]:
    importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
    matrix = values.float()
    return {p: weighted_error(matrix.numpy(), bnb_round_trip(matrix, p).numpy(), importance) for p in BNB_MENU}


CACHE_PREFIX = "distortion_"
CACHE_VERSION = 1  # raised when the errors are computed otherwise: an older file is then measured again


@dataclass
class DistortionCache:
    """e_t(q) of every tensor seen, per menu: {hf name: {option: error}} for llama.cpp types and for
    bitsandbytes precisions, read from `path` if it was written for the same fingerprint."""
    path: Path
    fingerprint: dict
    gguf: dict[str, dict[str, float]] = field(default_factory=dict)
    bnb: dict[str, dict[str, float]] = field(default_factory=dict)
    reused: int = 0
    measured: int = 0

    @classmethod
    def open(cls, cache_dir: Path, model_hash: str, imatrix_digest: str | None) -> "DistortionCache":
        path = Path(cache_dir) / f"{CACHE_PREFIX}{model_hash}_{imatrix_digest or 'no-imatrix'}.json"
        fingerprint = {"version": CACHE_VERSION, "model_hash": model_hash, "imatrix": imatrix_digest}
        data = read_cache(path, fingerprint, "distortion")
        return cls(path, fingerprint, data.get("gguf", {}), data.get("bnb", {}))

    def gguf_errors(self, entry: TensorEntry, values: np.ndarray, imatrix: ImportanceMatrix | None) -> dict[LlamaType, float]:
        return self._errors(self.gguf, entry, gguf_menu(entry.ncols), LlamaType,
                            lambda: gguf_errors(entry, values, imatrix))

    def bnb_errors(self, entry: TensorEntry, values: torch.Tensor, imatrix: ImportanceMatrix | None) -> dict[Precision, float]:
        return self._errors(self.bnb, entry, list(BNB_MENU), Precision, lambda: bnb_errors(entry, values, imatrix))

    def _errors(self, table: dict, entry: TensorEntry, menu: list, kind, measure) -> dict:
        cached = table.get(entry.hf_name)
        if cached is not None and set(cached) == {option.value for option in menu}:
            self.reused += 1
            return {kind(name): error for name, error in cached.items()}
        errors = measure()
        table[entry.hf_name] = {option.value: error for option, error in errors.items()}
        self.measured += 1
        return errors

    def save(self) -> None:
        """Write the table if anything was measured (the plans directory created if need be)."""
        if self.reused:
            log(f"distortion: {self.reused} tensor menus from {self.path}, {self.measured} measured")
        if self.measured:
            ensure_writable_dir(self.path.parent)
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "method": __doc__.strip(),
                                          "gguf": self.gguf, "bnb": self.bnb})
