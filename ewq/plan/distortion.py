"""Distortion per tensor and type: exact bytes and the measured relative error of every option.

For the `kld` score every matrix may take any llama.cpp type of its menu (quant_types.gguf_menu:
Q3_K … Q8_0 and F16, the legacy Q4_0/Q4_1/Q5_0/Q5_1 and IQ4_NL/IQ4_XS, where their blocks divide
its rows), and any bitsandbytes precision (quant_types.BNB_MENU). For each option this module gives
  bytes   exactly as written: rows × row bytes (llama-quantize), or bitsandbytes' storage;
  error   e_t(q) = Σⱼ aⱼ Σᵢ (wᵢⱼ−qᵢⱼ)² / Σⱼ aⱼ Σᵢ wᵢⱼ², aⱼ the importance of input column j (1 without
          an importance matrix), from llama.cpp's own quantizer and bitsandbytes' own round trip.
The predicted ΔKLD of an option is α_t · e_t(q), α_t measured per tensor (ewq.sensitivity, scores.py).

A tensor of more than SAMPLE_ABOVE weights (an 8B model's embedding and MLP matrices) has e_t(q) measured on
a seeded sample of whole rows holding at least SAMPLE_WEIGHTS weights: llama.cpp quantizes rows
independently, so each sampled row's error is exact, and the estimate's relative SE (sampled_ratio) is recorded
with it; bytes stay exact. Every matrix goes through in chunks of rows, so the host memory beyond the
tensor read is a few chunks per thread.

The errors are a reusable measurement (DistortionCache): one file per model hash and importance matrix in
the plans directory, so that a plan at another budget, or by another score, quantizes nothing again. It is
written after a plan's decision only (a refused budget leaves nothing behind); a tensor whose cached
options are not its menu of today is measured again.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..console import log
from ..fileio import ensure_writable_dir, read_cache, write_json_atomic
from ..llamacpp.quantizers import ImportanceMatrix, quantization_row_errors, ratio, row_errors
from ..quant_types import BNB_MENU, NF4_BLOCKSIZE, LlamaType, Precision, bnb_bits, gguf_menu
from .entries import TensorEntry


def gguf_bytes(entry: TensorEntry, llama_type: LlamaType) -> int:
    rows = entry.numel // entry.ncols
    return rows * llama_type.row_bytes(entry.ncols)


def bnb_bytes(entry: TensorEntry, precision: Precision) -> int:
    return round(entry.numel * bnb_bits(precision, entry.ncols) / 8)


SAMPLE_ABOVE = 1 << 25  # weights: a larger tensor's errors are measured on a sample of its rows
SAMPLE_WEIGHTS = 1 << 23  # weights the sample holds at least (whole rows)


def sampled_rows(entry: TensorEntry) -> np.ndarray | None:
    """The sorted row indices a large tensor's errors are measured on (the same rows of every slice of a
    stack), drawn without replacement, seeded by the tensor's name; None where every row is."""
    if entry.numel <= SAMPLE_ABOVE:
        return None
    rows = entry.shape[-2]
    wanted = min(rows, -(-SAMPLE_WEIGHTS // (entry.numel // rows)))
    seed = int.from_bytes(hashlib.sha256(entry.hf_name.encode()).digest()[:8], "little")
    return np.sort(np.random.default_rng(seed).choice(rows, wanted, replace=False))


@dataclass(frozen=True)
class Estimate:
    """e_t(q) of every option of one tensor; where its rows were sampled, how many of how many, and
    each estimate's relative standard error (option name -> SE / e)."""
    errors: dict
    rows: int | None = None
    of: int | None = None
    relative_se: dict[str, float] | None = None

    @property
    def sample(self) -> dict | None:
        """What the cache file records of the sample."""
        return None if self.rows is None else {"rows": self.rows, "of": self.of, "relative_se": self.relative_se}


def sampled_ratio(error: np.ndarray, energy: np.ndarray, population: int) -> tuple[float, float]:
    """Σ error / Σ energy over the rows measured (per-row sums, row_errors; over a stack a row index is
    one unit, its experts summed), and the estimate's relative SE when those rows are a simple random
    sample of `population` rows: the linearised ratio estimator's sqrt((1 − n/N)/n) · sd(errorᵢ −
    e·energyᵢ) / mean(energyᵢ), zero when every row was measured. Rows quantize independently in
    llama.cpp, so each sampled row's error is exact: the SE is the sampling error alone."""
    if error.ndim == 2:
        error, energy = error.sum(axis=0), energy.sum(axis=0)
    e = ratio(error.sum(), energy.sum())
    n = error.size
    if n >= population or n < 2 or e == 0.0:
        return e, 0.0
    se = np.sqrt((1 - n / population) / n) * float(np.std(error - e * energy, ddof=1)) / float(energy.mean())
    return e, se / e


def _estimate(entry: TensorEntry, values: torch.Tensor, sums, options: list, workers: int) -> Estimate:
    """sums(matrix, option) -> per-row (error, energy) of the float32 rows measured, for every option,
    on `workers` threads."""
    rows = sampled_rows(entry)
    taken = values if rows is None else values[..., torch.from_numpy(rows), :]
    matrix = taken.float().numpy()  # float32 [rows, cols] or [slices, rows, cols]: the sample only
    population = entry.shape[-2]
    with ThreadPoolExecutor(max_workers=min(len(options), workers)) as pool:
        estimates = pool.map(lambda option: sampled_ratio(*sums(matrix, option), population), options)
        measured = dict(zip(options, estimates))
    errors = {option: e for option, (e, _) in measured.items()}
    if rows is None:
        return Estimate(errors)
    return Estimate(errors, len(rows), population, {option.value: se for option, (_, se) in measured.items()})


def gguf_errors(entry: TensorEntry, values: torch.Tensor, imatrix: ImportanceMatrix | None) -> Estimate:
    """e_t(q) of every llama.cpp option, the types quantized on as many threads as there are cores
    (llama.cpp's quantizer runs outside the GIL), a chunk of rows at a time; on a sample of rows for a
    tensor of more than SAMPLE_ABOVE weights."""
    importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
    return _estimate(entry, values, lambda matrix, t: quantization_row_errors(matrix, t, importance),
                     gguf_menu(entry.ncols), os.cpu_count() or 1)


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


def bnb_errors(entry: TensorEntry, values: torch.Tensor, imatrix: ImportanceMatrix | None) -> Estimate:
    """e_t of every bitsandbytes precision, on the rows gguf_errors measures (nf4's double-quantized absmax
    then groups the sample's blocks, not the whole matrix's: part of what the SE does not cover)."""
    importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None

    def sums(matrix: np.ndarray, precision: Precision):
        return row_errors(matrix, bnb_round_trip(torch.from_numpy(matrix), precision).numpy(), importance)

    return _estimate(entry, values, sums, list(BNB_MENU), workers=1)  # torch's own threads quantize


CACHE_PREFIX = "distortion_"
CACHE_VERSION = 1  # raised when the errors are computed otherwise: an older file is then measured again


@dataclass
class DistortionCache:
    """e_t(q) of every tensor seen, per menu: {hf name: {option: error}} for llama.cpp types and for
    bitsandbytes precisions, and {hf name: Estimate.sample} of the tensors measured on a sample of rows,
    read from `path` if it was written for the same fingerprint."""
    path: Path
    fingerprint: dict
    gguf: dict[str, dict[str, float]] = field(default_factory=dict)
    bnb: dict[str, dict[str, float]] = field(default_factory=dict)
    sampled: dict[str, dict[str, dict]] = field(default_factory=dict)  # {"gguf"/"bnb": {hf name: sample}}
    reused: int = 0
    measured: int = 0

    @classmethod
    def open(cls, cache_dir: Path, model_hash: str, imatrix_digest: str | None) -> "DistortionCache":
        path = Path(cache_dir) / f"{CACHE_PREFIX}{model_hash}_{imatrix_digest or 'no-imatrix'}.json"
        fingerprint = {"version": CACHE_VERSION, "model_hash": model_hash, "imatrix": imatrix_digest}
        data = read_cache(path, fingerprint, "distortion")
        return cls(path, fingerprint, data.get("gguf", {}), data.get("bnb", {}), data.get("sampled", {}))

    def gguf_errors(self, entry: TensorEntry, values: torch.Tensor, imatrix: ImportanceMatrix | None) -> Estimate:
        return self._errors("gguf", self.gguf, entry, gguf_menu(entry.ncols), LlamaType,
                            lambda: gguf_errors(entry, values, imatrix))

    def bnb_errors(self, entry: TensorEntry, values: torch.Tensor, imatrix: ImportanceMatrix | None) -> Estimate:
        return self._errors("bnb", self.bnb, entry, list(BNB_MENU), Precision, lambda: bnb_errors(entry, values, imatrix))

    def _errors(self, menu_name: str, table: dict, entry: TensorEntry, menu: list, kind, measure) -> Estimate:
        cached = table.get(entry.hf_name)
        samples = self.sampled.setdefault(menu_name, {})
        if cached is not None and set(cached) == {option.value for option in menu}:
            self.reused += 1
            sample = samples.get(entry.hf_name) or {}
            return Estimate({kind(name): error for name, error in cached.items()}, sample.get("rows"),
                            sample.get("of"), sample.get("relative_se"))
        estimate = measure()
        table[entry.hf_name] = {option.value: error for option, error in estimate.errors.items()}
        samples.pop(entry.hf_name, None)
        if estimate.sample is not None:
            samples[entry.hf_name] = estimate.sample
        self.measured += 1
        return estimate

    def save(self) -> None:
        """Write the table if anything was measured (the plans directory created if need be)."""
        if self.reused:
            log(f"distortion: {self.reused} tensor menus from {self.path}, {self.measured} measured")
        if self.measured:
            ensure_writable_dir(self.path.parent)
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "method": __doc__.strip(),
                                          "gguf": self.gguf, "bnb": self.bnb, "sampled": self.sampled})


def sampling_summary(estimates: dict[str, Estimate]) -> str | None:
    """One line on the estimates made from a sample of rows (hf name -> estimate; None if none was)."""
    sampled = {name: e for name, e in estimates.items() if e.rows is not None}
    if not sampled:
        return None
    ses = sorted((se, option, name) for name, e in sampled.items() for option, se in e.relative_se.items())
    worst, option, name = ses[-1]
    fraction = max(e.rows / e.of for e in sampled.values())
    return (f"distortion: e_t(q) of {len(sampled)} tensors of more than {SAMPLE_ABOVE:,} weights from a seeded "
            f"sample of whole rows (at least {SAMPLE_WEIGHTS:,} weights, at most {fraction:.1%} of a tensor's rows): "
            f"relative SE median {ses[len(ses) // 2][0]:.2%}, at most {worst:.2%} ({option} of {name})")
