"""Shannon entropy of a weight tensor's value histogram, and the statistics recorded beside it.

    H(W) = - sum_i p_i log2 p_i,   p_i = c_i / numel(W)

where c_i counts the values of W that fall in bin i of `bins` equal-width bins spanning
[min(W), max(W)]. H lies in [0, log2(bins)]: 0 for a constant tensor, log2(bins) for values
spread evenly over their range. Because the bins span the observed range, one outlier
stretches the bins and lowers H: entropy here measures how evenly values fill their range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def histogram_entropy(values: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """Entropy in bits of the normalised `bins`-bin histogram of `values`."""
    flat = values.detach().reshape(-1).to(torch.float32)
    if flat.numel() == 0:
        raise ValueError("entropy of an empty tensor is undefined")
    low, high = flat.min().item(), flat.max().item()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("tensor holds inf or nan")
    if low == high:
        return 0.0
    counts = torch.histc(flat, bins=bins, min=low, max=high).to(torch.float64)
    probabilities = counts[counts > 0] / flat.numel()
    return float(-(probabilities * probabilities.log2()).sum())


def _chunks(flat: torch.Tensor, size: int = 1 << 22):
    for start in range(0, flat.numel(), size):
        yield flat[start:start + size].to(torch.float64)


def tensor_stats(values: torch.Tensor, bins: int = DEFAULT_BINS) -> TensorStats:
    """Entropy plus std, max|w|/std and excess kurtosis, in float64 over chunks so that the
    extra memory stays a few MiB whatever the tensor's size."""
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
    variance = m2 / count
    std = math.sqrt(variance)
    if std > 0:
        kurtosis = (m4 / count) / variance**2 - 3.0
        max_ratio = max_abs / std
    else:
        kurtosis, max_ratio = 0.0, 0.0
    return TensorStats(
        entropy_bits=histogram_entropy(values, bins),
        numel=count,
        std=std,
        max_abs_over_std=max_ratio,
        excess_kurtosis=kurtosis,
    )
