"""Every quantized type the project speaks of, and the ladders and menus built from them: definitions only.

The ground floor (like gguf-py's constants.py and its GGML_QUANT_SIZES table): imported by every
floor above, importing nothing of the project but its errors.
  LlamaType   one member per ggml type that gguf-py knows (`LlamaType.Q4_K`), whose value is the
              name llama.cpp prints and llama-quantize takes ("Q4_K"); block size, bits per weight
              and row bytes come from gguf-py's own table, so names and sizes cannot drift apart
  Precision   what bitsandbytes holds a matrix in (fp16, int8, nf4), with its storage per weight
  menus       what a matrix may take, per target, as a function of its row length:
                THRESHOLD_TYPES  the threshold rule's llama.cpp type per precision
                RANK_LADDER      the rank-ordered size-budget ladder (Q4_K … F16, legacy where K blocks do not fit)
                GGUF_MENU        the kld score's menu (Q3_K … F16), cheapest first at equal size
                BNB_MENU         bitsandbytes' nf4, int8, fp16
  Arithmetic  how llama.cpp's kernels round a quantized matmul's input (activation_type): per weight type on
              the CPU, Q8_1 for every type on CUDA, or not modelled (the weights' error alone)
"""
from __future__ import annotations

from enum import Enum

import gguf
from gguf import GGMLQuantizationType as GGMLType

from .errors import UserError


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


class Precision(str, Enum):
    """What bitsandbytes holds a matrix in."""
    FP16 = "fp16"
    INT8 = "8bit"
    INT4 = "4bit"


# bitsandbytes' modules as the project builds them: Linear8bitLt's outlier threshold, Linear4bit's nf4 block
INT8_OUTLIER_THRESHOLD = 6.0
NF4_BLOCKSIZE = 64
# nf4 storage, bits per weight: 4-bit codes in blocks of 64 with double-quantized absmax (8-bit absmax
# per block + fp32 per 256 blocks); int8 stores one fp32 scale per row (bnb_bits)
BNB_NF4_BITS = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * 256)


def bnb_bits(precision: Precision, ncols: int) -> float:
    """bitsandbytes storage of a matrix with rows of `ncols` values, per weight."""
    if precision is Precision.FP16:
        return 16.0
    if precision is Precision.INT8:
        return 8.0 + 32.0 / ncols
    return BNB_NF4_BITS


# --- menus: what a matrix of rows of `ncols` values may take ------------------------------------------

# The threshold rule: llama.cpp type per precision, best first; the first whose block divides the row is used
THRESHOLD_TYPES = {
    Precision.FP16: (LlamaType.F16,),
    Precision.INT8: (LlamaType.Q8_0,),
    Precision.INT4: (LlamaType.Q4_K, LlamaType.Q4_0),
}
# The rank-ordered size-budget ladder; where K-quant blocks (256) do not divide a row the legacy type
# of the same size is used, and Q6_K, which has none, is skipped
RANK_LADDER = (LlamaType.Q4_K, LlamaType.Q5_K, LlamaType.Q6_K, LlamaType.Q8_0, LlamaType.F16)
LEGACY_SAME_SIZE = {LlamaType.Q4_K: LlamaType.Q4_0, LlamaType.Q5_K: LlamaType.Q5_0}
# The kld score's menu, cheapest first at equal size, so that the reference type (the cheapest that
# fits) is reproducible
GGUF_MENU = (LlamaType.Q3_K, LlamaType.IQ4_XS, LlamaType.Q4_0, LlamaType.IQ4_NL, LlamaType.Q4_K, LlamaType.Q4_1,
             LlamaType.Q5_0, LlamaType.Q5_K, LlamaType.Q5_1, LlamaType.Q6_K, LlamaType.Q8_0, LlamaType.F16)
BNB_MENU = (Precision.INT4, Precision.INT8, Precision.FP16)  # cheapest first


def threshold_type(precision: Precision, ncols: int) -> LlamaType:
    """The threshold rule's llama.cpp type for a matrix; F16 where no block size divides the row
    (llama.cpp would fall back to F16 too)."""
    return next((t for t in THRESHOLD_TYPES[precision] if t.fits_rows(ncols)), LlamaType.F16)


def rank_ladder(ncols: int) -> list[LlamaType]:
    """The rank-ordered ladder's rungs for rows of `ncols` values (F16 at least)."""
    rungs = []
    for llama_type in RANK_LADDER:
        if not llama_type.fits_rows(ncols):
            llama_type = LEGACY_SAME_SIZE.get(llama_type)
            if llama_type is None or not llama_type.fits_rows(ncols):
                continue
        if llama_type not in rungs:
            rungs.append(llama_type)
    return rungs or [LlamaType.F16]


def gguf_menu(ncols: int) -> list[LlamaType]:
    """The kld menu's types whose blocks divide rows of `ncols` values (F16 always)."""
    return [t for t in GGUF_MENU if t.fits_rows(ncols)]


def reference_type(ncols: int) -> LlamaType:
    """The type a tensor's sensitivity is measured at: the cheapest of its menu (the largest error)."""
    return min(gguf_menu(ncols), key=lambda t: (t.bits_per_weight, GGUF_MENU.index(t)))


# --- llama.cpp's activations: what a matmul's input is rounded to, per weight type --------------------------

class Arithmetic(str, Enum):
    """Whose matmuls a kld plan's predictions model. A quantized matmul in llama.cpp does not multiply
    float inputs: it rounds them to blocks of int8 first (the weight type's vec_dot_type), and that
    rounding costs KLD of its own, which a measurement in the Hugging Face model does not see."""
    CPU = "cpu"  # ggml-cpu's type_traits_cpu: CPU_ACTIVATION_TYPE
    CUDA = "cuda"  # ggml-cuda's MMQ / MMVQ: every quantized type's input to Q8_1 blocks of 32
    WEIGHTS = "weights"  # the weights' error alone (kld plans made before)


# ggml-cpu.c type_traits_cpu[].vec_dot_type for the menu's types; F16 weights take F16 inputs, as the F16
# reference file's do, so they add nothing against it
CPU_ACTIVATION_TYPE = {
    LlamaType.Q4_0: LlamaType.Q8_0, LlamaType.Q5_0: LlamaType.Q8_0, LlamaType.Q8_0: LlamaType.Q8_0,
    LlamaType.IQ4_NL: LlamaType.Q8_0, LlamaType.Q4_1: LlamaType.Q8_1, LlamaType.Q5_1: LlamaType.Q8_1,
    LlamaType.Q2_K: LlamaType.Q8_K, LlamaType.Q3_K: LlamaType.Q8_K, LlamaType.Q4_K: LlamaType.Q8_K,
    LlamaType.Q5_K: LlamaType.Q8_K, LlamaType.Q6_K: LlamaType.Q8_K, LlamaType.IQ4_XS: LlamaType.Q8_K,
}
UNQUANTIZED_INPUT = (LlamaType.F16, LlamaType.BF16, LlamaType.F32)


def activation_type(weight_type: LlamaType, arithmetic: Arithmetic) -> LlamaType | None:
    """The block type a matmul's input is rounded to for a weight of `weight_type` (None: not rounded, or
    not modelled); a ValueError for a type whose CPU kernel is not in the table."""
    if arithmetic is Arithmetic.WEIGHTS or weight_type in UNQUANTIZED_INPUT:
        return None
    if arithmetic is Arithmetic.CUDA:
        return LlamaType.Q8_1
    if weight_type not in CPU_ACTIVATION_TYPE:
        raise ValueError(f"no CPU activation type recorded for {weight_type}")
    return CPU_ACTIVATION_TYPE[weight_type]
