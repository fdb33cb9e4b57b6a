"""llama.cpp's own quantizers, in process: quantize a matrix to a ggml type and read it back.

ggml_quantize_chunk() comes from the libggml-base that the llama_cpp bindings carry (the same
vendored llama.cpp as our tools), so a tensor quantized here is bit-identical to what
llama-quantize writes for it; gguf-py's dequantizers turn the blocks back into float32.
Used to measure a tensor's quantization error (the `error` plan score) and to simulate "only
this block in 4 bits" on the Hugging Face model (the sensitivity study) without writing files.
An importance matrix (llama-imatrix's GGUF output, ImportanceMatrix) weights columns by the mean
squared activation that reaches them, as llama-quantize does with --imatrix.
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import quants

from ..errors import UserError
from ..quant_types import LlamaType


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the llama_cpp bindings are not installed; run scripts/setup.sh")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        raise UserError(f"libggml-base not found in {lib_dir}; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def quantize(matrix: np.ndarray, llama_type: LlamaType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of `matrix` (float32 [rows, cols]) as ggml blocks: uint8 [rows, row_bytes]."""
    rows, cols = matrix.shape
    if not llama_type.fits_rows(cols):
        raise ValueError(f"{llama_type} blocks do not divide rows of {cols} columns")
    ggml_type = int(llama_type.ggml)
    lib = _library()
    lib.ggml_quantize_init(ggml_type)
    src = np.ascontiguousarray(matrix, dtype=np.float32)
    row_bytes = lib.ggml_row_size(ggml_type, cols)
    dst = np.empty((rows, row_bytes), dtype=np.uint8)
    weights = None
    if imatrix is not None:
        weights = np.ascontiguousarray(imatrix, dtype=np.float32)
        if weights.shape != (cols,):
            raise ValueError(f"importance vector has shape {weights.shape}, expected ({cols},)")
    written = lib.ggml_quantize_chunk(ggml_type, src.ctypes.data, dst.ctypes.data, 0, rows, cols,
                                      None if weights is None else weights.ctypes.data)
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst


def _slice(imatrix: np.ndarray | None, index: int, cols: int) -> np.ndarray | None:
    """The importance vector of slice `index` of a 3-D weight [slices, rows, cols] (an expert, a head of
    DeepSeek's attn_k_b): llama-quantize reads it at imatrix + index·cols, so a per-expert [experts,
    cols] matrix and llama-imatrix's flat [slices·cols] vector for a 3-D weight in a plain matmul are
    read alike; a vector of `cols` serves every slice."""
    if imatrix is None or imatrix.size == cols:
        return imatrix if imatrix is None else imatrix.reshape(cols)
    return imatrix.reshape(-1, cols)[index]


CHUNK_WEIGHTS = 1 << 20  # weights per quantized chunk of rows: what a round trip holds beside its input


def row_chunks(rows: int, cols: int) -> list[slice]:
    """Slices of whole rows of about CHUNK_WEIGHTS weights each (at least one row)."""
    step = max(1, CHUNK_WEIGHTS // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def round_trip(matrix: np.ndarray, llama_type: LlamaType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """What llama.cpp's kernels see after quantizing `matrix` to `llama_type`, as float32. A stack of
    experts [experts, rows, cols] (or of heads) is quantized slice by slice, each with its own
    importance row, as llama-quantize does. Rows are quantized independently (ggml_quantize_chunk works
    row by row, the importance per column), so a matrix goes through in chunks of rows (row_chunks):
    the same values, and beside the input and output only one chunk's blocks and dequantization."""
    if matrix.ndim == 3:
        return np.stack([round_trip(m, llama_type, _slice(imatrix, e, matrix.shape[2])) for e, m in enumerate(matrix)])
    if llama_type is LlamaType.F32:
        return np.asarray(matrix, dtype=np.float32)
    if llama_type is LlamaType.F16:
        return np.asarray(matrix, dtype=np.float16).astype(np.float32)
    out = np.empty(matrix.shape, dtype=np.float32)
    for rows in row_chunks(*matrix.shape):
        blocks = quantize(matrix[rows], llama_type, imatrix)
        out[rows] = quants.dequantize(blocks, llama_type.ggml).reshape(out[rows].shape)
    return out


def relative_error(matrix: np.ndarray, llama_type: LlamaType, imatrix: np.ndarray | None = None) -> float:
    """The relative error (see weighted_error) of `matrix` quantized to `llama_type`."""
    error, energy = quantization_row_errors(matrix, llama_type, imatrix)
    return ratio(error.sum(), energy.sum())


def quantization_row_errors(matrix: np.ndarray, llama_type: LlamaType,
                            imatrix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """row_errors(matrix, round_trip(matrix, llama_type, imatrix), imatrix), one chunk of rows at a time
    (the round trip of the whole matrix is never held)."""
    if matrix.ndim == 3:
        sums = [quantization_row_errors(m, llama_type, _slice(imatrix, e, matrix.shape[2]))
                for e, m in enumerate(matrix)]
        return np.stack([num for num, _ in sums]), np.stack([den for _, den in sums])
    error, energy = np.empty(matrix.shape[0]), np.empty(matrix.shape[0])
    for rows in row_chunks(*matrix.shape):
        chunk = np.asarray(matrix[rows], dtype=np.float32)
        error[rows], energy[rows] = row_errors(chunk, round_trip(chunk, llama_type, imatrix), imatrix)
    return error, energy


def row_errors(matrix: np.ndarray, approx: np.ndarray, imatrix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Σⱼ aⱼ (wᵢⱼ−qᵢⱼ)², Σⱼ aⱼ wᵢⱼ²) per row i, float64 [rows] ([experts, rows] over a stack, each
    expert its own a), a the importance (1 if none); in chunks of rows, so that the float64 work
    stays one chunk whatever the size."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim == 3:
        sums = [row_errors(m, q, _slice(imatrix, e, matrix.shape[2])) for e, (m, q) in enumerate(zip(matrix, approx))]
        return np.stack([num for num, _ in sums]), np.stack([den for _, den in sums])
    column_weight = np.ones(matrix.shape[1]) if imatrix is None else np.asarray(imatrix, dtype=np.float64).reshape(-1)
    error, energy = np.empty(matrix.shape[0]), np.empty(matrix.shape[0])
    for rows in row_chunks(*matrix.shape):
        m = matrix[rows].astype(np.float64)
        error[rows] = ((m - approx[rows]) ** 2) @ column_weight
        energy[rows] = (m ** 2) @ column_weight
    return error, energy


def ratio(error: float, energy: float) -> float:
    """error / energy, a relative error; 0 where the energy is 0 (an all-zero tensor loses nothing)."""
    return float(error) / float(energy) if energy > 0 else 0.0


def weighted_error(matrix: np.ndarray, approx: np.ndarray, imatrix: np.ndarray | None = None) -> float:
    """sum_j a_j sum_i (w_ij - q_ij)^2 / sum_j a_j sum_i w_ij^2, with a = importance (1 if none):
    the expected relative squared error of the layer's output for inputs of that energy. Over a
    stack of experts [experts, rows, cols], the sums run over every expert (each its own a)."""
    error, energy = row_errors(matrix, approx, imatrix)
    return ratio(error.sum(), energy.sum())


class ImportanceMatrix:
    """llama-imatrix's GGUF output: per GGUF tensor name, the mean squared activation of every
    input column (in_sum2 / counts); for a stack of experts one row per expert ([experts, cols],
    each over its own count, 1 where an expert saw no token, as llama-quantize reads it)."""

    def __init__(self, vectors: dict[str, np.ndarray], path: Path):
        self.vectors, self.path = vectors, path

    def for_tensor(self, gguf_name: str | None) -> np.ndarray | None:
        """The importance vector of a tensor; None where it has none (or no GGUF name)."""
        return self.vectors.get(gguf_name) if gguf_name else None

    @classmethod
    def load(cls, path: Path) -> "ImportanceMatrix":
        from gguf import GGUFReader

        path = Path(path)
        if not path.is_file():
            raise UserError(f"importance matrix not found: {path}")
        try:
            reader = GGUFReader(path)
        except (ValueError, KeyError, IndexError) as error:
            raise UserError(f"cannot read importance matrix {path}: {error}") from None
        arrays = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
        vectors = {}
        for name, sums in arrays.items():
            if name.endswith(".in_sum2"):
                base = name.removesuffix(".in_sum2")
                counts = arrays.get(f"{base}.counts")
                if counts is None or counts.size == 0 or sums.size % counts.size:
                    continue
                if counts.size > 1:  # per expert
                    counts = counts.reshape(-1, 1).astype(np.float32)  # float32, as llama-quantize divides
                    per_expert = sums.reshape(counts.size, -1).astype(np.float32)
                    vectors[base] = np.where(counts > 0, per_expert / np.maximum(counts, 1), np.float32(1))
                elif counts[0] > 0:
                    vectors[base] = (sums / counts[0]).astype(np.float32)
        if not vectors:
            raise UserError(f"{path} holds no importance vectors (not a llama-imatrix GGUF file?)")
        return cls(vectors, path)
