"""GGUF files read back: their tensors, sizes and type histogram, and the proof that a plan was applied.

The `gguf` package's reader: the types, sizes and bits per weight written in every result come
from the file itself, not from what was asked of llama-quantize.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..results.record import WeightsReport


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str
    n_elements: int
    n_bytes: int


def read_tensors(path: Path) -> list[GGUFTensor]:
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError) as error:
        raise UserError(f"cannot read GGUF {path}: {error}") from None
    return [GGUFTensor(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]


def describe(path: Path) -> WeightsReport:
    """Tensor bytes, bits per weight over all tensors, file size and the type histogram, read from the file."""
    tensors = read_tensors(path)
    histogram = collections.Counter(t.type_name for t in tensors)
    return WeightsReport(weight_bytes=sum(t.n_bytes for t in tensors), n_weights=sum(t.n_elements for t in tensors),
                         details={"file": str(path), "file_bytes": Path(path).stat().st_size,
                                  "type_histogram": dict(sorted(histogram.items()))})


def verify_plan(plan, path: Path) -> dict:
    """Every planned tensor's type in the file equals the plan's; a mismatch is an error naming them."""
    in_file = {t.name: t.type_name for t in read_tensors(path)}
    mismatches, missing = [], []
    for entry in plan.tensors:
        if not entry.gguf_name:
            if entry.is_matrix:
                missing.append(f"{entry.hf_name} (no GGUF name)")
            continue
        if entry.gguf_name not in in_file:
            missing.append(entry.gguf_name)
        elif in_file[entry.gguf_name] != entry.llama_type:
            mismatches.append(f"{entry.gguf_name}: plan {entry.llama_type}, file {in_file[entry.gguf_name]}")
    if mismatches or missing:
        raise UserError(f"{path} does not follow plan {plan.plan_hash}: "
                        + "; ".join(mismatches + [f"{name}: missing" for name in missing]))
    return {"plan_hash": plan.plan_hash, "tensors_checked": sum(1 for e in plan.tensors if e.gguf_name),
            "matches_plan": True}
