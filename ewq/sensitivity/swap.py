"""Tensors of a loaded model swapped for their llama.cpp round trips, and restored afterwards."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from ..experts import ModelTensors
from ..llamacpp.quantizers import ImportanceMatrix, round_trip, weighted_error
from ..quant_types import LlamaType

if TYPE_CHECKING:  # annotations only: ewq.plan's scores import this module
    from ..plan.entries import TensorEntry

Change = tuple["TensorEntry", LlamaType]  # a plan entry and the type its values take


@contextmanager
def swapped(tensors: ModelTensors, changes: Iterable[Change], imatrix: ImportanceMatrix | None,
            errors: dict[str, float] | None = None):
    """Inside the block, each entry's values in the model (a stack: every expert's; a part: its
    elements in its source) are their round trip through their type, quantized by llama.cpp's own
    code with the entry's importance rows; afterwards the model is as it was. `errors`, if given,
    receives each entry's relative error there (the first time it is seen)."""
    saved = []
    try:
        for entry, llama_type in changes:
            values = tensors.values(entry)
            saved.append((entry, values))
            original = values.float().cpu().numpy()
            importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
            approx = round_trip(original, llama_type, importance)
            if errors is not None and entry.hf_name not in errors:
                errors[entry.hf_name] = weighted_error(original, approx, importance)
            tensors.assign(entry, torch.from_numpy(np.ascontiguousarray(approx)))
        yield
    finally:
        for entry, values in reversed(saved):
            tensors.assign(entry, values)
