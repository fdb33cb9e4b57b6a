"""Does entropy predict sensitivity? Quantize one unit at a time and measure the damage.

A unit is one transformer block (all its matrices) or one tensor kind (e.g. every attn_v).
For each unit, its matrices are replaced in the Hugging Face model by their llama.cpp 4-bit
round trip (Q4_K, or Q4_0 where Q4_K blocks do not divide the rows: the plan's 4-bit rule,
optionally weighted by the importance matrix as llama-quantize does), everything else stays
exact, and the KL divergence to the unmodified model is measured on the same token windows.
Then Spearman's rho (with a bootstrap interval over units) relates that sensitivity to the
unit's entropy and to simpler statistics: numel, std, excess kurtosis, max|w|/std and the
measured 4-bit relative error itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import numpy as np
import torch

from .backends.base import Backend
from .console import progress
from .experts import ModelTensors
from .llamacpp.quantizers import ImportanceMatrix, round_trip, weighted_error
from .metrics import perplexity
from .metrics.stats import paired_difference, spearman_bootstrap
from .plan.model import Plan, Precision, TensorEntry, llama_type_for, param_weighted_mean

PREDICTORS = ("entropy_bits", "numel", "std", "excess_kurtosis", "max_abs_over_std", "q4_relative_error")
STUDY_KIND = "sensitivity-study"  # the "kind" of a study file, which tells it from benchmark results
FOUR_BIT_RULE = "Q4_K where its 256-blocks divide the rows, else Q4_0"


class Level(str, Enum):
    BLOCK = "block"
    KIND = "kind"


@dataclass
class Unit:
    level: Level
    label: str
    tensors: list[TensorEntry]


def tensor_kind(entry: TensorEntry) -> str:
    """'attn_v' for blk.3.attn_v.weight (GGUF names are uniform across architectures)."""
    name = entry.gguf_name or entry.hf_name
    parts = name.split(".")
    return parts[2] if len(parts) > 3 and parts[0] == "blk" else ".".join(parts[:-1])


def units(plan: Plan, levels: tuple[Level, ...]) -> list[Unit]:
    matrices = [t for t in plan.tensors if t.is_matrix and t.block is not None]
    out = []
    if Level.BLOCK in levels:
        for block in sorted({t.block for t in matrices}):
            out.append(Unit(Level.BLOCK, f"blk.{block}", [t for t in matrices if t.block == block]))
    if Level.KIND in levels:
        for kind in sorted({tensor_kind(t) for t in matrices}):
            out.append(Unit(Level.KIND, kind, [t for t in matrices if tensor_kind(t) == kind]))
    return out


@contextmanager
def quantized(model: torch.nn.Module, unit: Unit, imatrix: ImportanceMatrix | None, errors: dict[str, float]):
    """Swap the unit's matrices for their 4-bit round trip; restore them afterwards."""
    tensors, saved = ModelTensors(model), []
    try:
        for entry in unit.tensors:
            values = tensors.values(entry)
            saved.append((entry, values))
            original = values.float().cpu().numpy()
            importance = imatrix.for_tensor(entry.gguf_name) if imatrix else None
            approx = round_trip(original, llama_type_for(Precision.INT4, entry), importance)
            if entry.hf_name not in errors:
                errors[entry.hf_name] = weighted_error(original, approx, importance)
            tensors.assign(entry, torch.from_numpy(approx))
        yield
    finally:
        for entry, values in saved:
            tensors.assign(entry, values)


def measure(model: torch.nn.Module, backend: Backend, tokens: list[int], spec: perplexity.WindowSpec,
            plan: Plan, levels: tuple[Level, ...], imatrix: ImportanceMatrix | None,
            done: Sequence[dict] = (), on_row: Callable[[list[dict]], None] | None = None) -> dict:
    """The study. `done` holds the rows of the first units from an interrupted run (the unmodified
    model's reference is recomputed: it is deterministic); `on_row` gets all rows after each unit."""
    starts = perplexity.window_starts(len(tokens), spec)
    n_windows = min(spec.kld_windows, len(starts))
    vocab = backend.vocab_size
    reference = np.empty((n_windows * spec.stride, vocab), dtype=np.float16)
    base = perplexity.evaluate(backend, tokens, spec, record=reference)
    errors: dict[str, float] = {}
    rows = list(done)
    for unit in progress(units(plan, levels)[len(rows):], desc="sensitivity", unit="unit"):
        with quantized(model, unit, imatrix, errors):
            result = perplexity.evaluate(backend, tokens, spec, reference=reference)
        row = {
            "level": unit.level.value,
            "unit": unit.label,
            "tensors": [t.gguf_name or t.hf_name for t in unit.tensors],
            "types": sorted({llama_type_for(Precision.INT4, t).value for t in unit.tensors}),
            "kld": {k: result["kld"][k] for k in ("mean", "se", "p99", "n_windows", "n_tokens")},
            "mean_nll_delta": paired_difference(result["per_window_nll"], base["per_window_nll"]).to_json(paired=True),
            "numel": sum(t.numel for t in unit.tensors),
        }
        for key in PREDICTORS:
            if key == "q4_relative_error":
                row[key] = param_weighted_mean(unit.tensors, lambda t: errors[t.hf_name])
            elif key != "numel":
                row[key] = param_weighted_mean(unit.tensors, lambda t, key=key: getattr(t, key))
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return {"base_ppl": base["ppl"], "units": rows, "correlations": correlations(rows)}


def correlations(rows: list[dict]) -> dict:
    """Spearman's rho of every predictor against KLD, per level, with a bootstrap interval."""
    out = {}
    for level in sorted({r["level"] for r in rows}):
        subset = [r for r in rows if r["level"] == level]
        kld = [r["kld"]["mean"] for r in subset]
        out[level] = {key: spearman_bootstrap([r[key] for r in subset], kld) for key in PREDICTORS}
    return out
