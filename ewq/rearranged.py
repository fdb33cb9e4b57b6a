"""Matrices the converter rearranges: one checkpoint matrix, written as one or more other tensors.

llama.cpp's converter writes some checkpoint matrices in another layout, and llama-quantize
quantizes what is written: DeepSeek-V2/V3's (also GLM's, Kimi's) kv_b_proj [heads·(nope+v), rank]
becomes attn_k_b [heads, rank, nope] (each head's rows transposed) and attn_v_b [heads, v, rank];
DBRX's experts [experts·ff, hidden] become [experts, ff, hidden]. A plan holds one entry per
written tensor, a *part*: hf_name `<source>:<GGUF name>`, `source` the checkpoint tensor, shape
as written. Its values are the source's elements picked by an index map that the converter
itself produced (llamacpp.names runs it on the source's flat positions), so each rearrangement is
followed without being written again here, and errors are measured on the rows llama.cpp
quantizes. A matrix whose values the converter computes (not only moves) has no map: refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .llamacpp.names import Naming, gguf_names


@dataclass(frozen=True)
class Part:
    source: str  # the checkpoint tensor
    source_shape: tuple[int, ...]
    gguf_name: str
    shape: tuple[int, ...]  # as the converter writes it (torch order)
    index: np.ndarray = field(repr=False, compare=False)  # [numel]: flat position in the source of each element

    @property
    def name(self) -> str:
        """The plan entry's hf_name."""
        return f"{self.source}:{self.gguf_name}"

    def of(self, source: torch.Tensor) -> torch.Tensor:
        """The part's values [shape] from the source's [source_shape]."""
        return source.reshape(-1)[self._positions(source.device)].reshape(self.shape)

    def put(self, source: torch.Tensor, values: torch.Tensor) -> None:
        """Write the part's values back into their places in `source` (contiguous), cast to its dtype."""
        source.view(-1)[self._positions(source.device)] = values.reshape(-1).to(device=source.device,
                                                                               dtype=source.dtype)

    def _positions(self, device: torch.device) -> torch.Tensor:
        # the map as it is (int32 below 2^31 elements: torch indexes with it directly), no copy on the host
        index = torch.from_numpy(self.index)
        return index if device.type == "cpu" else index.to(device)


def parts_of(naming: Naming, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Part]]:
    """checkpoint tensor -> its parts, for every tensor (of `shapes`) the converter rearranges with an
    index map for each output."""
    out = {}
    for source, outputs in (naming.written or {}).items():
        if source in shapes and outputs and all(o.index is not None for o in outputs):
            out[source] = [Part(source, tuple(shapes[source]), o.name, tuple(o.shape), o.index) for o in outputs]
    return out


def model_parts(model_dir: str | Path) -> dict[str, Part]:
    """part name -> Part of every rearranged matrix of a model directory, found by running the
    converter's naming child (a few seconds): for a plan read from its file. A plan being made gets
    its parts from its own naming (plan.create.name_tensors) and passes them on."""
    from . import weights

    files = weights.open_model(model_dir)
    shapes = {info.name: info.shape for info in weights.list_tensors(files)}
    parts = parts_of(gguf_names(Path(files.root), files.config, []), shapes)
    return by_name(parts)


def by_name(parts: dict[str, list[Part]]) -> dict[str, Part]:
    """part name -> Part, from parts_of's checkpoint tensor -> its parts."""
    return {part.name: part for of_one in parts.values() for part in of_one}
