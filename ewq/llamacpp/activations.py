"""llama.cpp's activation blocks, in torch: what a quantized matmul's input becomes before it is multiplied.

A matmul with a quantized weight does not multiply float inputs: ggml first rounds each row of the input
to the weight type's vec_dot_type (quant_types.activation_type) and takes the dot product in integers.
The input's values as that product sees them, per block along the row (ggml-quants.c, *_ref):
  Q8_0, Q8_1  32 values, d = absmax / 127, q = roundf(x / d) (half away from zero), value q · fp16(d)
              (Q8_1 also stores the block's sum, which changes no value)
  Q8_K        256 values, m = the value of largest magnitude, q = nearest_int(-127 x / m) (half to even)
              capped at 127, value q · (m / -127) in float32
  F16         the input in half precision
"""
from __future__ import annotations

import torch

from ..quant_types import LlamaType

BLOCK = {LlamaType.Q8_0: 32, LlamaType.Q8_1: 32, LlamaType.Q8_K: 256}


def _roundf(values: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round takes them to even)."""
    return torch.sign(values) * torch.floor(values.abs() + 0.5)


def round_trip(x: torch.Tensor, activation: LlamaType) -> torch.Tensor:
    """`x` [..., cols] (float32) as llama.cpp's dot products see it after rounding to `activation`, bit for
    bit (a scalar over a tensor is written as a tensor division: torch computes `c / t` as c · (1 / t),
    one rounding more than C); a ValueError for another type or for rows that its blocks do not divide."""
    if activation is LlamaType.F16:
        return x.half().to(x.dtype)
    if activation not in BLOCK:
        raise ValueError(f"{activation} is not an activation type of llama.cpp's matmuls")
    block = BLOCK[activation]
    if x.shape[-1] % block:
        raise ValueError(f"{activation} blocks of {block} do not divide rows of {x.shape[-1]} values")
    blocks = x.float().reshape(-1, block)
    if activation is LlamaType.Q8_K:
        peak = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed, [blocks, 1]
        inverse = torch.where(peak != 0, torch.full_like(peak, -127.0) / peak, torch.zeros_like(peak))
        levels = torch.round(inverse * blocks).clamp(max=127)
        scale = torch.where(inverse != 0, torch.ones_like(inverse) / inverse, torch.zeros_like(inverse))
    else:
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        levels = _roundf(blocks * torch.where(step > 0, torch.ones_like(step) / step, torch.zeros_like(step)))
        scale = step.half().float()
    return (levels * scale).reshape(x.shape).to(x.dtype)
