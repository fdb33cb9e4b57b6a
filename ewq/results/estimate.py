"""Every figure the project reports is an Estimate(mean, se, n), written beside the result record.

In result JSON it is written as {"mean", "se", "n"} (to_json), and a paired difference also
carries its z score and whether it lies beyond 2 SE (to_json(paired=True)); Estimate.from_json
reads either back. How estimates are computed lives in metrics/stats.py.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    mean: float | None
    se: float | None  # None for fewer than two items
    n: int

    @property
    def z(self) -> float | None:
        return self.mean / self.se if self.se else None

    @property
    def significant_2se(self) -> bool | None:
        """|mean| > 2 SE; None without an SE."""
        return None if self.z is None else abs(self.z) > 2

    def to_json(self, paired: bool = False) -> dict:
        out = {"mean": self.mean, "se": self.se, "n": self.n}
        if paired and self.se:
            out.update(z=self.z, significant_2se=self.significant_2se)
        return out

    @classmethod
    def from_json(cls, data: dict | None, mean_key: str = "mean", n_key: str = "n") -> "Estimate | None":
        """An estimate from a result file; `mean_key` / `n_key` for the few figures written otherwise
        (perplexity's "value", BLEU's "score", KLD's "n_windows")."""
        if not isinstance(data, dict) or data.get(mean_key) is None:
            return None
        return cls(data[mean_key], data.get("se"), data.get(n_key, 0))
