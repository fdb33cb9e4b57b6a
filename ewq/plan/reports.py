"""What a plan reports of itself, typed: the budget a size-budget plan reached (BudgetReport) and the
summary every plan file carries (PlanSummary). The plan file holds their to_json(); from_json reads
them back, so no other module walks their keys."""
from __future__ import annotations

from dataclasses import dataclass, fields

GGUF, BNB = "gguf", "bitsandbytes"  # the two targets of a plan, as its files name them


@dataclass
class TargetReport:
    """What one target (GGUF or bitsandbytes) of a size-budget plan reached."""
    bits_per_weight: float
    bytes: int
    meets_budget: bool
    floor_bits_per_weight: float | None = None  # bitsandbytes: every allocated matrix on nf4
    predicted_kld: float | None = None  # kld score: Σ predicted ΔKLD of the chosen types
    measured_kld_calibration: float | None = None  # kld score, GGUF: the whole plan measured at once
    # kld score with a correction round, GGUF: the first allocation's Σ predicted ΔKLD and its KLD measured at once
    first_predicted_kld: float | None = None
    first_measured_kld_calibration: float | None = None

    def to_json(self) -> dict:
        """Every field that is set, in field order (a plan file's bytes do not depend on the reader)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: dict) -> "TargetReport":
        return cls(**data)


@dataclass
class BudgetReport:
    """The budget of a size-budget plan and what each target reached (budget.decide)."""
    budget_bits_per_weight: float
    budget_bytes: int
    gguf: TargetReport
    bitsandbytes: TargetReport

    def to_json(self) -> dict:
        return {"budget_bits_per_weight": self.budget_bits_per_weight, "budget_bytes": self.budget_bytes,
                GGUF: self.gguf.to_json(), BNB: self.bitsandbytes.to_json()}

    @classmethod
    def from_json(cls, data: dict | None) -> "BudgetReport | None":
        if data is None:
            return None
        return cls(data["budget_bits_per_weight"], data["budget_bytes"], TargetReport.from_json(data[GGUF]),
                   TargetReport.from_json(data[BNB]))


@dataclass(frozen=True)
class PrecisionCount:
    tensors: int
    params: int


@dataclass(frozen=True)
class PlanSummary:
    """Matrices and blocks per bitsandbytes precision, and the estimated size of both targets."""
    matrices_by_precision: dict[str, PrecisionCount]  # precision value -> matrices holding it
    blocks_by_precision: dict[str, int]
    total_params: int
    gguf_bits_per_weight: float
    bnb_bits_per_weight: float
    gguf_bytes: int
    bnb_bytes: int

    def to_json(self) -> dict:
        return {
            "matrices_by_precision": {p: {"tensors": c.tensors, "params": c.params}
                                      for p, c in self.matrices_by_precision.items()},
            "blocks_by_precision": self.blocks_by_precision,
            "total_params": self.total_params,
            "estimated_bits_per_weight": {GGUF: self.gguf_bits_per_weight, BNB: self.bnb_bits_per_weight},
            "estimated_bytes": {GGUF: self.gguf_bytes, BNB: self.bnb_bytes},
        }
