"""What a size-budget plan ranks matrices by: one small interface, one class per Score.

A scorer sees every tensor once, while its values are in memory during the single pass over the
weights (`observe`), then scores every ranked matrix (`scores`): a rank score each, highest =
needs bits most, and, for the kld score, a predicted distortion of every option.
  entropy  the histogram entropy already in the entry (EWQ: high entropy = needs bits)
  error    relative (importance-weighted) squared error on the ladder's lowest rung, measured
           with llama.cpp's own quantizer: Σⱼ aⱼ Σᵢ (wᵢⱼ−qᵢⱼ)² / Σⱼ aⱼ Σᵢ wᵢⱼ²
  random   a seeded shuffle: the control
  kld      predicted ΔKLD of every llama.cpp type and bitsandbytes precision, α_t · e_t(q), with α_t
           measured end to end (measure.py: per tensor, or shared by a group); its rank score is the
           predicted ΔKLD at the reference type (for a tensor measured alone, the measured one)
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from ..llamacpp.quantizers import ImportanceMatrix, relative_error
from ..llamacpp.types import LlamaType
from . import distortion, measure
from .budget import gguf_ladder
from .model import PlanParams, Precision, Score, TensorEntry, keep_reason


@dataclass
class Scores:
    """What a scorer says of the ranked matrices (hf_name keys)."""
    rank: dict[str, float]
    gguf: dict[str, dict[LlamaType, float]] | None = None  # predicted ΔKLD per llama.cpp type (kld only)
    bnb: dict[str, dict[Precision, float]] | None = None  # predicted ΔKLD per bitsandbytes precision (kld only)


class Scorer(ABC):
    score: Score

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        """See one tensor's values during the pass over the weights (default: nothing to measure)."""

    @abstractmethod
    def scores(self, ranked: list[TensorEntry]) -> Scores:
        """Scores of every ranked matrix."""


class EntropyScorer(Scorer):
    score = Score.ENTROPY

    def scores(self, ranked: list[TensorEntry]) -> Scores:
        return Scores({t.hf_name: t.entropy_bits for t in ranked})


class ErrorScorer(Scorer):
    score = Score.ERROR

    def __init__(self, params: PlanParams, imatrix: ImportanceMatrix | None):
        self.params, self.imatrix, self.errors = params, imatrix, {}

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        if entry.is_matrix and keep_reason(entry, self.params) is None:
            floor = gguf_ladder(entry)[0]
            importance = self.imatrix.for_tensor(entry.gguf_name) if self.imatrix else None
            self.errors[entry.hf_name] = relative_error(values.float().numpy(), floor, importance)

    def scores(self, ranked: list[TensorEntry]) -> Scores:
        return Scores({t.hf_name: self.errors[t.hf_name] for t in ranked})


class RandomScorer(Scorer):
    score = Score.RANDOM

    def __init__(self, seed: int):
        self.seed = seed

    def scores(self, ranked: list[TensorEntry]) -> Scores:
        rng = random.Random(self.seed)
        return Scores({t.hf_name: rng.random() for t in sorted(ranked, key=lambda t: t.hf_name)})


@dataclass(frozen=True)
class Calibration:
    """Where and how the kld score measures: the model, the cache, the device, the windows."""
    model_dir: Path
    model_hash: str
    cache_dir: Path
    device: str
    spec: measure.CalibrationSpec


class KldScorer(Scorer):
    score = Score.KLD

    def __init__(self, params: PlanParams, imatrix: ImportanceMatrix | None, calibration: Calibration):
        self.params, self.imatrix, self.calibration = params, imatrix, calibration
        self.gguf_errors: dict[str, dict[LlamaType, float]] = {}
        self.bnb_errors: dict[str, dict[Precision, float]] = {}

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        if entry.is_matrix and keep_reason(entry, self.params) is None:
            matrix = values.float()
            self.gguf_errors[entry.hf_name] = distortion.gguf_errors(entry, matrix.numpy(), self.imatrix)
            if entry.is_bnb_linear:
                self.bnb_errors[entry.hf_name] = distortion.bnb_errors(entry, matrix, self.imatrix)

    def scores(self, ranked: list[TensorEntry]) -> Scores:
        reference = {t.hf_name: distortion.reference_type(t) for t in ranked}
        c = self.calibration
        groups = measure.groups_for(ranked, self.params.sensitivity_band)
        kld = measure.measured_kld(c.model_dir, c.model_hash, groups, reference, self.imatrix,
                                   self.params.imatrix_digest, c.spec, c.cache_dir, c.device)
        floor_error = {t.hf_name: self.gguf_errors[t.hf_name][reference[t.hf_name]] for t in ranked}
        alpha = sensitivity(groups, kld, floor_error)
        return Scores(rank={name: alpha[name] * floor_error[name] for name in floor_error},
                      gguf={name: {q: alpha[name] * e for q, e in errors.items()}
                            for name, errors in self.gguf_errors.items()},
                      bnb={name: {p: alpha[name] * e for p, e in errors.items()}
                           for name, errors in self.bnb_errors.items()})


def sensitivity(groups: list[measure.Group], kld: dict[str, float], floor_error: dict[str, float]) -> dict[str, float]:
    """α_t of every member: ΔKLD_g(ref) / Σ e_t(ref) over its group (a tensor alone: ΔKLD_t / e_t)."""
    alpha = {}
    for group in groups:
        errors = sum(floor_error[t.hf_name] for t in group.entries)
        alpha.update({t.hf_name: kld[group.name] / errors if errors > 0 else 0.0 for t in group.entries})
    return alpha


def scorer_for(params: PlanParams, imatrix: ImportanceMatrix | None = None,
               calibration: Calibration | None = None) -> Scorer:
    if params.score is Score.KLD:
        return KldScorer(params, imatrix, calibration)
    if params.score is Score.ERROR:
        return ErrorScorer(params, imatrix)
    if params.score is Score.RANDOM:
        return RandomScorer(params.seed)
    return EntropyScorer()
