"""Shannon entropy of a weight tensor's value histogram, and the statistics recorded beside it.

    H(W) = - sum_i p_i log2 p_i,   p_i = c_i / numel(W)

where c_i counts the values of W that fall in bin i of `bins` equal-width bins spanning
[min(W), max(W)]. H lies in [0, log2(bins)]: 0 for a constant tensor, log2(bins) for values
spread evenly over their range. Because the bins span the observed range, one outlier
stretches the bins and lowers H: entropy here measures how evenly values fill their range.

A 16-bit float tensor (bf16, fp16: nearly every checkpoint) holds at most 65,536 distinct values, so
its statistics come from one counting pass over its bit patterns (np.bincount): the histogram, the
range and the moments are then exact sums over the distinct values, with the same bin edges as
torch.histc (tested equal). Wider types take the chunked float64 path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ENTROPY_FORMULA = "H = -sum_i p_i*log2(p_i), p_i = count_i/numel over `bins` equal-width bins on [min(W), max(W)]"
DEFAULT_BINS = 256


@dataclass(frozen=True)
class TensorStats:
    entropy_bits: float
    numel: int
    std: float
    max_abs_over_std: float
    excess_kurtosis: float


SIXTEEN_BIT_FLOATS = (torch.bfloat16, torch.float16)
_COUNT_CHUNK = 1 << 18  # elements per np.bincount call: its int64 copy stays in cache


def _entropy_of_counts(counts: torch.Tensor, numel: int) -> float:
    probabilities = counts[counts > 0].to(torch.float64) / numel
    return float(-(probabilities * probabilities.log2()).sum())


def _check_range(low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("tensor holds inf or nan")


def histogram_entropy(values: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Entropy in bits of the normalised `bins`-bin histogram of `values`."""
    flat = values.detach().reshape(-1).to(torch.float32)
    if flat.numel() == 0:
        raise ValueError("entropy of an empty tensor is undefined")
    low, high = flat.min().item(), flat.max().item()
    _check_range(low, high)
    if low == high:
        return 0.0
    return _entropy_of_counts(torch.histc(flat, bins=bins, min=low, max=high), flat.numel())


def value_counts(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of a bf16/fp16 tensor (float32, ascending bit patterns) and how often each
    occurs, int64: one pass of np.bincount over the 16-bit patterns."""
    bits = values.detach().contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    counts = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, bits.size, _COUNT_CHUNK):
        counts += np.bincount(bits[start:start + _COUNT_CHUNK], minlength=1 << 16)
    present = np.flatnonzero(counts)
    distinct = torch.from_numpy(present.astype(np.uint16).view(np.int16)).view(values.dtype).to(torch.float32)
    return distinct, torch.from_numpy(counts[present])


def _stats_from_counts(values: torch.Tensor, bins: int) -> TensorStats:
    distinct, counts = value_counts(values)
    count = int(counts.sum())
    low, high = distinct.min(), distinct.max()
    _check_range(float(low), float(high))
    if low == high:
        entropy = 0.0
    else:  # torch.histc's bin of each value: float32 (v - low) * bins / (high - low), the top edge in the last bin
        bin_of = ((distinct - low) * bins / (high - low)).long().clamp(max=bins - 1)
        entropy = _entropy_of_counts(torch.bincount(bin_of, weights=counts.to(torch.float64), minlength=bins), count)
    v, c = distinct.to(torch.float64), counts.to(torch.float64)
    mean = float((c * v).sum()) / count
    squared = (v - mean) ** 2
    return _summary(entropy, count, float((c * squared).sum()), float((c * squared * squared).sum()),
                    float(v.abs().max()))


def _summary(entropy: float, count: int, m2: float, m4: float, max_abs: float) -> TensorStats:
    """From the central moment sums Σ(w−μ)², Σ(w−μ)⁴ and max|w|."""
    variance = m2 / count
    std = math.sqrt(variance)
    if std > 0:
        kurtosis = (m4 / count) / variance**2 - 3.0
        max_ratio = max_abs / std
    else:
        kurtosis, max_ratio = 0.0, 0.0
    return TensorStats(entropy_bits=entropy, numel=count, std=std, max_abs_over_std=max_ratio,
                       excess_kurtosis=kurtosis)


def _chunks(flat: torch.Tensor, size: int = 1 << 22):
    for start in range(0, flat.numel(), size):
        yield flat[start:start + size].to(torch.float64)


def tensor_stats(values: torch.Tensor, bins: int = DEFAULT_BINS) -> TensorStats:
    """Entropy plus std, max|w|/std and excess kurtosis: from the value counts of a 16-bit float
    tensor, else in float64 over chunks so that the extra memory stays a few MiB whatever the size."""
    if values.dtype in SIXTEEN_BIT_FLOATS and values.numel() > 0:
        return _stats_from_counts(values, bins)
    flat = values.detach().reshape(-1)
    count = flat.numel()
    mean = sum(float(chunk.sum()) for chunk in _chunks(flat)) / count
    m2 = m4 = 0.0
    max_abs = 0.0
    for chunk in _chunks(flat):
        centred = chunk - mean
        squared = centred * centred
        m2 += float(squared.sum())
        m4 += float((squared * squared).sum())
        max_abs = max(max_abs, float(chunk.abs().max()))
    return _summary(histogram_entropy(values, bins), count, m2, m4, max_abs)
