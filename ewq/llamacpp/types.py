"""llama.cpp's tensor types as one enum, parsed once from a name and carrying their sizes.

`LlamaType` has one member per ggml type that gguf-py knows (`LlamaType.Q4_K`), whose value is
the name llama.cpp prints and llama-quantize takes ("Q4_K"): a plan stores the name, code
holds the member, and `block_size` / `bits_per_weight` / `fits_rows` come from gguf-py's own
table (GGML_QUANT_SIZES), so the vocabulary and the sizes cannot drift apart.
"""
from __future__ import annotations

from enum import Enum

import gguf
from gguf import GGMLQuantizationType as GGMLType

from ..errors import UserError


class _LlamaTypeBase(str, Enum):
    """Members are built from GGMLType below; a member compares equal to its name."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def ggml(self) -> GGMLType:
        return GGMLType[self.value]

    @property
    def block_size(self) -> int:
        """Values per block: a row must hold a whole number of blocks."""
        return gguf.GGML_QUANT_SIZES[self.ggml][0]

    @property
    def bits_per_weight(self) -> float:
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.ggml]
        return 8.0 * type_size / block_size

    def fits_rows(self, ncols: int) -> bool:
        return ncols % self.block_size == 0

    def row_bytes(self, ncols: int) -> int:
        """Bytes of one row of `ncols` values, as llama-quantize writes it."""
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.ggml]
        return ncols // block_size * type_size


LlamaType = _LlamaTypeBase("LlamaType", {t.name: t.name for t in GGMLType})

VECTOR_TYPE = LlamaType.F32  # llama.cpp keeps 1-D tensors (norms, biases) in F32
# Matrices that the converter writes in F32 and llama-quantize never quantizes, whatever it is asked
# (llama-quant.cpp, tensor_allows_quantization): MoE expert routers and small recurrent-model weights.
NEVER_QUANTIZED = ("ffn_gate_inp.weight", "ssm_conv1d", "shortconv.conv.weight", "time_mix_first.weight",
                   "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
                   "time_mix_lerp_fused.weight")
BASE_TYPE = LlamaType.Q8_0  # the quantize script's base type: quantized, so that per-tensor overrides are honoured


def never_quantized(gguf_name: str | None) -> bool:
    """Whether llama-quantize leaves this GGUF tensor as the converter wrote it (NEVER_QUANTIZED)."""
    return bool(gguf_name) and any(part in gguf_name for part in NEVER_QUANTIZED)


def parse_type(name: str) -> LlamaType:
    """'q4_k' or 'Q4_K' -> LlamaType.Q4_K; an unknown name is a UserError naming it."""
    try:
        return LlamaType[str(name).upper()]
    except KeyError:
        raise UserError(f"unknown llama.cpp tensor type '{name}'") from None
