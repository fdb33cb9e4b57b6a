"""What a size-budget plan ranks matrices by: one small interface, one class per Score.

A scorer sees every tensor once, while its values are in memory during the single pass over the
weights (`observe`), then returns a score per ranked matrix (`scores`), highest = needs bits most.
  entropy  the histogram entropy already in the entry (EWQ: high entropy = needs bits)
  error    relative (importance-weighted) squared error on the ladder's lowest rung, measured
           with llama.cpp's own quantizer: Σⱼ aⱼ Σᵢ (wᵢⱼ−qᵢⱼ)² / Σⱼ aⱼ Σᵢ wᵢⱼ²
  random   a seeded shuffle: the control
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod

import torch

from ..llamacpp.quantizers import ImportanceMatrix, relative_error
from .budget import gguf_ladder
from .model import PlanParams, Score, TensorEntry, keep_reason


class Scorer(ABC):
    score: Score

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        """See one tensor's values during the pass over the weights (default: nothing to measure)."""

    @abstractmethod
    def scores(self, ranked: list[TensorEntry]) -> dict[str, float]:
        """hf_name -> score for every ranked matrix."""


class EntropyScorer(Scorer):
    score = Score.ENTROPY

    def scores(self, ranked: list[TensorEntry]) -> dict[str, float]:
        return {t.hf_name: t.entropy_bits for t in ranked}


class ErrorScorer(Scorer):
    score = Score.ERROR

    def __init__(self, params: PlanParams, imatrix: ImportanceMatrix | None):
        self.params, self.imatrix, self.errors = params, imatrix, {}

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        if entry.is_matrix and keep_reason(entry, self.params) is None:
            floor = gguf_ladder(entry)[0]
            importance = self.imatrix.for_tensor(entry.gguf_name) if self.imatrix else None
            self.errors[entry.hf_name] = relative_error(values.float().numpy(), floor, importance)

    def scores(self, ranked: list[TensorEntry]) -> dict[str, float]:
        return {t.hf_name: self.errors[t.hf_name] for t in ranked}


class RandomScorer(Scorer):
    score = Score.RANDOM

    def __init__(self, seed: int):
        self.seed = seed

    def scores(self, ranked: list[TensorEntry]) -> dict[str, float]:
        rng = random.Random(self.seed)
        return {t.hf_name: rng.random() for t in sorted(ranked, key=lambda t: t.hf_name)}


def scorer_for(params: PlanParams, imatrix: ImportanceMatrix | None = None) -> Scorer:
    if params.score is Score.ERROR:
        return ErrorScorer(params, imatrix)
    if params.score is Score.RANDOM:
        return RandomScorer(params.seed)
    return EntropyScorer()
