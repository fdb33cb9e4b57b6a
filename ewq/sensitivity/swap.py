"""Tensors of a loaded model swapped for their llama.cpp round trips, and restored afterwards.

Host memory: a plain matrix (its own parameter) is round-tripped in place, one chunk of rows at a time
(llama.cpp quantizes rows independently, so this is the whole matrix's round trip), on every core, and what is kept to
restore it is a copy in the narrowest float dtype that holds its values exactly (bf16 for a bf16
checkpoint measured in float32): about half a tensor per swapped tensor, never the model twice.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from ..experts import ModelTensors
from ..llamacpp.quantizers import ImportanceMatrix, ratio, round_trip, row_chunks, row_errors, weighted_error
from ..quant_types import LlamaType

if TYPE_CHECKING:  # annotations only: ewq.plan's scores import this module
    from ..plan.entries import TensorEntry

Change = tuple["TensorEntry", LlamaType]  # a plan entry and the type its values take


def exact_copy(values: torch.Tensor) -> torch.Tensor:
    """A copy of `values` in bfloat16 or float16 where that holds every value exactly, else in its own dtype."""
    flat = values.reshape(-1)
    for narrow in (torch.bfloat16, torch.float16):
        if values.dtype.itemsize <= narrow.itemsize:
            break
        copy = flat.to(narrow)
        step = 1 << 20
        if all(torch.equal(copy[i:i + step].to(values.dtype), flat[i:i + step]) for i in range(0, flat.numel(), step)):
            return copy.reshape(values.shape)
        del copy
    return values.clone()


def round_trip_in_place(matrix: torch.Tensor, llama_type: LlamaType, importance: np.ndarray | None,
                        with_error: bool = True) -> float | None:
    """Replace a [rows, cols] parameter's values by their round trip, chunks of rows on as many threads as
    there are cores (llama.cpp's quantizer runs outside the GIL; the chunks are disjoint rows), on the
    parameter's own device and in its own dtype; returns their relative error (quantizers.weighted_error),
    or None without `with_error` (its float64 sums cost about 5% of a K-quant's round trip)."""
    def chunk(rows: slice) -> tuple[float, float]:
        original = matrix[rows].float().cpu().numpy()
        approx = round_trip(original, llama_type, importance)
        # before the assignment: a float32 parameter's `original` is a view of it
        sums = tuple(float(s.sum()) for s in row_errors(original, approx, importance)) if with_error else (0.0, 0.0)
        matrix[rows] = torch.from_numpy(approx).to(device=matrix.device, dtype=matrix.dtype)
        return sums

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        sums = list(pool.map(chunk, row_chunks(*matrix.shape)))
    return ratio(sum(e for e, _ in sums), sum(e for _, e in sums)) if with_error else None


@contextmanager
def swapped(tensors: ModelTensors, changes: Iterable[Change], imatrix: ImportanceMatrix | None,
            errors: dict[str, float] | None = None, restore: bool = True):
    """Inside the block, each entry's values in the model (a stack: every expert's; a part: its
    elements in its source) are their round trip through their type, quantized by llama.cpp's own
    code with the entry's importance rows; afterwards the model is as it was. `errors`, if given,
    receives each entry's relative error there (the first time it is seen). With `restore` False
    nothing is kept to restore (a whole plan swapped at once would keep a copy of the model):
    the model stays perturbed, for a caller's last use of it. The block is given what is kept to restore,
    hf_name -> the entry's original values (the shape of ModelTensors.values; empty without `restore`)."""
    saved = []
    try:
        for entry, llama_type in changes:
            importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
            own = not entry.source and not entry.experts and len(entry.shape) == 2
            if own:  # its own parameter: in place
                matrix = tensors.view(entry.hf_name, tuple(entry.shape))
                if restore:
                    saved.append((entry, exact_copy(matrix)))
                error = round_trip_in_place(matrix, llama_type, importance, with_error=errors is not None)
            else:  # a stack of experts or a part: through a copy of its values
                values = tensors.values(entry)
                if restore:
                    saved.append((entry, values))
                original = values.float().cpu().numpy()
                approx = round_trip(original, llama_type, importance)
                error = weighted_error(original, approx, importance) if errors is not None else None
                del values, original
                tensors.assign(entry, torch.from_numpy(np.ascontiguousarray(approx)))
            if errors is not None and entry.hf_name not in errors:
                errors[entry.hf_name] = error
        yield {entry.hf_name: values for entry, values in saved}
    finally:
        for entry, values in reversed(saved):
            tensors.assign(entry, values)
