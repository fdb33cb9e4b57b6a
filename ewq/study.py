"""Does entropy predict sensitivity? Quantize one unit at a time and measure the damage.

A unit is one transformer block (all its matrices) or one tensor kind (e.g. every attn_v).
For each unit, its matrices are replaced in the Hugging Face model by their llama.cpp 4-bit
round trip (Q4_K, or Q4_0 where Q4_K blocks do not divide the rows: the plan's 4-bit rule,
optionally weighted by the importance matrix as llama-quantize does), everything else stays
exact, and the KL divergence to the unmodified model is measured on the same token windows of
the evaluation text (the last `stride` tokens of each), by the same service as the kld score
(ewq.sensitivity.service: one swap, one KLD).
Then Spearman's rho (with a bootstrap interval over units) relates that sensitivity to the
unit's entropy and to simpler statistics: numel, std, excess kurtosis, max|w|/std and the
measured 4-bit relative error itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import torch

from .console import progress
from .llamacpp.quantizers import ImportanceMatrix
from .metrics import perplexity
from .metrics.stats import mean_se, paired_difference, percentile, spearman_bootstrap
from .plan.entries import Plan, TensorEntry, param_weighted_mean
from .quant_types import Precision, threshold_type
from .rearranged import Part
from .sensitivity.service import SensitivityService

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


def four_bit(entry: TensorEntry):
    """The plan's 4-bit rule for a matrix (FOUR_BIT_RULE)."""
    return threshold_type(Precision.INT4, entry.ncols)


def study_service(model: torch.nn.Module, tokens: list[int], spec: perplexity.WindowSpec,
                  imatrix: ImportanceMatrix | None, parts: dict[str, Part] | None = None) -> SensitivityService:
    """The service on the study's windows (perplexity's: `context` tokens every `stride`, the last
    `stride` of each scored), the unmodified model's outputs computed once."""
    starts = perplexity.window_starts(len(tokens), spec)[: spec.kld_windows]
    windows = torch.tensor([tokens[start:start + spec.context] for start in starts])
    scored = slice(spec.context - spec.stride - 1, spec.context - 1)  # row i predicts token i+1
    return SensitivityService(model, windows, imatrix, parts, scored=scored, nll=True)


def measure(service: SensitivityService, plan: Plan, levels: tuple[Level, ...], done: Sequence[dict] = (),
            on_row: Callable[[list[dict]], None] | None = None) -> dict:
    """The study. `done` holds the rows of the first units from an interrupted run (the unmodified
    model's reference is recomputed: it is deterministic); `on_row` gets all rows after each unit."""
    errors: dict[str, float] = {}
    rows = list(done)
    todo = units(plan, levels)[len(rows):]
    for unit in progress(todo, desc="sensitivity", unit="unit"):
        result = service.measure([(t, four_bit(t)) for t in unit.tensors], errors)
        kld = mean_se(result.per_window_kld)
        token_kld = result.token_kld.tolist()
        row = {
            "level": unit.level.value,
            "unit": unit.label,
            "tensors": [t.gguf_name or t.hf_name for t in unit.tensors],
            "types": sorted({four_bit(t).value for t in unit.tensors}),
            "kld": {"mean": kld.mean, "se": kld.se, "p99": percentile(token_kld, 99), "n_windows": kld.n,
                    "n_tokens": len(token_kld)},
            "mean_nll_delta": paired_difference(result.per_window_nll, service.base_nll).to_json(paired=True),
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
    base_ppl = math.exp(mean_se(service.base_nll).mean)
    return {"base_ppl": base_ppl, "units": rows, "correlations": correlations(rows)}


def correlations(rows: list[dict]) -> dict:
    """Spearman's rho of every predictor against KLD, per level, with a bootstrap interval."""
    out = {}
    for level in sorted({r["level"] for r in rows}):
        subset = [r for r in rows if r["level"] == level]
        kld = [r["kld"]["mean"] for r in subset]
        out[level] = {key: spearman_bootstrap([r[key] for r in subset], kld) for key in PREDICTORS}
    return out


# --- the study file, read back ------------------------------------------------------------------

@dataclass(frozen=True)
class Correlation:
    """Spearman's rho of one predictor against KLD over one level's units, with its bootstrap interval."""
    rho: float | None
    ci: tuple[float, float] | None

    @classmethod
    def from_json(cls, data: dict) -> "Correlation":
        return cls(data["rho"], tuple(data["ci"]) if data.get("ci") else None)


@dataclass(frozen=True)
class UnitRow:
    """One unit of a study: its level and label, the KLD when only it is 4-bit, and its predictors."""
    level: str
    unit: str
    kld: float
    kld_se: float | None
    predictors: dict[str, float]

    @classmethod
    def from_json(cls, data: dict) -> "UnitRow":
        return cls(data["level"], data["unit"], data["kld"]["mean"], data["kld"]["se"],
                   {key: data[key] for key in PREDICTORS})


@dataclass(frozen=True)
class StudyFile:
    """A study as study_sensitivity.py writes it (its one reader)."""
    model_hash: str
    created_utc: str
    four_bit_rule: str
    imatrix: str | None
    n_windows: int
    stride: int
    units: list[UnitRow]
    correlations: dict[str, dict[str, Correlation]]  # level -> predictor -> rho

    @classmethod
    def from_json(cls, data) -> "StudyFile | None":
        """The study in `data`, or None for JSON that is not a study (or not a readable one)."""
        if not isinstance(data, dict) or data.get("kind") != STUDY_KIND:
            return None
        try:
            return cls(data["model_hash"], data.get("created_utc", ""), data["four_bit_rule"], data["imatrix"],
                       data["windows"]["n_windows"], data["windows"]["stride"],
                       [UnitRow.from_json(row) for row in data["units"]],
                       {level: {key: Correlation.from_json(stat) for key, stat in stats.items()}
                        for level, stats in data["correlations"].items()})
        except (KeyError, TypeError, ValueError):
            return None
