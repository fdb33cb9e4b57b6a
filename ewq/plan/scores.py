"""What a size-budget plan ranks matrices by: one small interface, one class per Score and allocator.

A scorer sees every tensor once, while its values are in memory during the single pass over the
weights (`observe`), then scores every ranked matrix (`scores`): a rank score each, highest =
needs bits most, and, for the optimized allocator, a predicted ΔKLD of every option, α_t · e_t(q)
(PredictingScorer; α_t = 1 for error, rows × a kind boost for pr15550, the entropy for entropy, seeded
for random, measured for kld).
With the ranked allocator (--allocator ranked, how entropy/error/random plans were made before):
  entropy  the histogram entropy already in the entry (EWQ: high entropy = needs bits)
  error    relative (importance-weighted) squared error on the ranked ladder's lowest rung, measured
           with llama.cpp's own quantizer: Σⱼ aⱼ Σᵢ (wᵢⱼ−qᵢⱼ)² / Σⱼ aⱼ Σᵢ wᵢⱼ²
  random   a seeded shuffle: the control
  kld      predicted ΔKLD of every llama.cpp type and bitsandbytes precision, α_t · e_t(q), with α_t
           measured end to end (ewq.sensitivity: per tensor, or shared by a group); its rank score is the
           predicted ΔKLD at the reference type (for a tensor measured alone, the measured one). In
           llama.cpp's arithmetic (--kld-arithmetic cpu / cuda) a llama.cpp type's prediction is
           α_t · (e_t(q) + r_t(a(q))): r_t the relative error of t's output from rounding its input to the
           activation type a(q) that llama.cpp's matmul takes for q (quant_types.activation_type), measured
           on the calibration windows; an F16 matrix, and every bitsandbytes option, add nothing
"""
from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..console import log
from ..errors import UserError
from ..llamacpp.quantizers import ImportanceMatrix, relative_error
from ..quant_types import Arithmetic, LlamaType, Precision, activation_type, rank_ladder, reference_type
from ..sensitivity.cached import CachedSensitivity
from ..sensitivity.service import Group, groups_for
from . import distortion
from .entries import Allocator, PlanParams, Score, TensorEntry


@dataclass
class Scores:
    """What a scorer says of the ranked matrices (hf_name keys)."""
    rank: dict[str, float]
    gguf: dict[str, dict[LlamaType, float]] | None = None  # predicted ΔKLD per llama.cpp type (kld only)
    bnb: dict[str, dict[Precision, float]] | None = None  # predicted ΔKLD per bitsandbytes precision (kld only)


class Scorer(ABC):
    score: Score

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        """See one tensor's values during the pass over the weights, its keep-rule applied (default:
        nothing to measure)."""

    @abstractmethod
    def scores(self, ranked: list[TensorEntry]) -> Scores:
        """Scores of every ranked matrix."""


class EntropyScorer(Scorer):
    score = Score.ENTROPY

    def scores(self, ranked: list[TensorEntry]) -> Scores:
        return Scores({t.hf_name: t.entropy_bits for t in ranked})


class ErrorScorer(Scorer):
    score = Score.ERROR

    def __init__(self, imatrix: ImportanceMatrix | None):
        self.imatrix, self.errors = imatrix, {}

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        if not entry.is_kept:
            floor = rank_ladder(entry.ncols)[0]
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


class PredictingScorer(Scorer):
    """Predicted ΔKLD of every option of both menus, α_t · e_t(q): the relative errors e_t(q) of every
    type measured in the pass over the weights (distortion.py), α_t per score (`alpha`); its rank score
    is the prediction at the reference type (the cheapest of the menu). Every score that can be put
    into this form is allocated by the same optimizer over the same menu (Allocator.OPTIMIZED)."""

    distortions: distortion.DistortionCache | None = None  # errors already measured for this model and imatrix

    def __init__(self, imatrix: ImportanceMatrix | None):
        self.imatrix = imatrix
        self.gguf_errors: dict[str, dict[LlamaType, float]] = {}
        self.bnb_errors: dict[str, dict[Precision, float]] = {}
        self.estimates: dict[str, distortion.Estimate] = {}  # of the llama.cpp menus: which were sampled

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        if not entry.is_kept:
            source = distortion if self.distortions is None else self.distortions
            estimate = source.gguf_errors(entry, values, self.imatrix)
            self.gguf_errors[entry.hf_name] = estimate.errors
            self.estimates[entry.hf_name] = estimate
            if entry.is_bnb_linear:
                self.bnb_errors[entry.hf_name] = source.bnb_errors(entry, values, self.imatrix).errors

    @abstractmethod
    def alpha(self, ranked: list[TensorEntry], reference: dict[str, LlamaType],
              floor_error: dict[str, float]) -> dict[str, float]:
        """α_t of every ranked matrix, given its reference type and its relative error there."""

    def input_errors(self, ranked: list[TensorEntry]) -> dict[str, dict[LlamaType, float]]:
        """What a llama.cpp type adds to e_t(q) in the units of e_t: r_t(a(q)) of llama.cpp's rounded inputs
        (KldScorer); none by default."""
        return {}

    def scores(self, ranked: list[TensorEntry]) -> Scores:
        summary = distortion.sampling_summary(self.estimates)
        if summary:
            log(summary)
        reference = {t.hf_name: reference_type(t.ncols) for t in ranked}
        floor_error = {t.hf_name: self.gguf_errors[t.hf_name][reference[t.hf_name]] for t in ranked}
        alpha = self.alpha(ranked, reference, floor_error)
        added = self.input_errors(ranked)
        gguf = {name: {q: alpha[name] * (e + added.get(name, {}).get(q, 0.0)) for q, e in errors.items()}
                for name, errors in self.gguf_errors.items() if name in alpha}
        return Scores(rank={name: gguf[name][reference[name]] for name in floor_error},
                      gguf=gguf,
                      bnb={name: {p: alpha[name] * e for p, e in errors.items()}
                           for name, errors in self.bnb_errors.items()})


class KldScorer(PredictingScorer):
    """α_t measured end to end: ΔKLD when only t (or its group) is on its reference type, over e_t there;
    times t's factor from a correction round where one was made (`corrections`, create.correct)."""
    score = Score.KLD

    def __init__(self, band: int | None, imatrix: ImportanceMatrix | None, sensitivity: CachedSensitivity,
                 arithmetic: Arithmetic = Arithmetic.WEIGHTS):
        super().__init__(imatrix)
        self.band, self.sensitivity, self.arithmetic = band, sensitivity, arithmetic
        self.corrections: dict[str, float] = {}  # hf_name -> factor on α_t (none: 1)

    def alpha(self, ranked, reference, floor_error):
        groups = groups_for(ranked, self.band)
        measured = sensitivity(groups, self.sensitivity.group_klds(groups, reference), floor_error)
        return {name: a * self.corrections.get(name, 1.0) for name, a in measured.items()}

    def input_errors(self, ranked):
        if self.arithmetic is Arithmetic.WEIGHTS:
            return {}
        measured = self.sensitivity.activation_errors(ranked, self.arithmetic)
        added = {}
        for name, menu in self.gguf_errors.items():
            for q in menu:
                activation = activation_type(q, self.arithmetic)
                r = measured.get(name, {}).get(activation.value) if activation is not None else None
                if r is not None:
                    added.setdefault(name, {})[q] = r
        return added


class ErrorPredictor(PredictingScorer):
    """α_t = 1: the importance-weighted relative error itself, summed over tensors, each tensor's weighing
    alike whatever its size; no end-to-end measurement."""
    score = Score.ERROR

    def alpha(self, ranked, reference, floor_error):
        return {t.hf_name: 1.0 for t in ranked}


# llama.cpp PR #15550 (target_bpw_type in src/llama-quant.cpp of its branch), constants by tensor kind
PR15550_BOOST = {"ffn_down": 6.0, "output": 3.0, "tied_embedding": 2.5, "attn_v": 1.25}


class Pr15550Predictor(PredictingScorer):
    """α_t = rows_t × boost_t: the error llama.cpp PR #15550's --target-bpw minimises. It sums a relative
    error per row (weighted squared error over the row's weighted norm, from the importance matrix), so a
    tensor weighs as its number of rows (rows of every expert of a stack), and it boosts ffn_down (6),
    the output head (3), a tied embedding (2.5) and attn_v (1.25). Our e_t is the relative error of the
    whole tensor, the mean of the per-row ones where rows have like norms; the PR's taper of the boosts
    below 2.2 bits per weight and its cosine error for attn_q / attn_k are not reproduced."""
    score = Score.PR15550

    def __init__(self, imatrix: ImportanceMatrix | None):
        super().__init__(imatrix)
        self.has_head = False  # an output head of its own: the embedding is then not tied

    def observe(self, entry: TensorEntry, values: torch.Tensor) -> None:
        self.has_head = self.has_head or entry.is_lm_head
        super().observe(entry, values)

    def boost(self, t: TensorEntry) -> float:
        name = t.gguf_name or t.hf_name
        if t.is_lm_head:
            return PR15550_BOOST["output"]
        if t.is_embedding:
            return 1.0 if self.has_head else PR15550_BOOST["tied_embedding"]
        return next((PR15550_BOOST[kind] for kind in ("ffn_down", "attn_v") if kind in name), 1.0)

    def alpha(self, ranked, reference, floor_error):
        return {t.hf_name: float(math.prod(t.shape[:-1])) * self.boost(t) for t in ranked}


class EntropyPredictor(PredictingScorer):
    """α_t = the tensor's entropy in bits: EWQ's hypothesis (high entropy needs bits) in the same form."""
    score = Score.ENTROPY

    def alpha(self, ranked, reference, floor_error):
        return {t.hf_name: t.entropy_bits for t in ranked}


class RandomPredictor(PredictingScorer):
    """α_t uniform in [0, 1), seeded (in name order): the control."""
    score = Score.RANDOM

    def __init__(self, imatrix: ImportanceMatrix | None, seed: int):
        super().__init__(imatrix)
        self.seed = seed

    def alpha(self, ranked, reference, floor_error):
        rng = random.Random(self.seed)
        return {t.hf_name: rng.random() for t in sorted(ranked, key=lambda t: t.hf_name)}


def sensitivity(groups: list[Group], kld: dict[str, float], floor_error: dict[str, float]) -> dict[str, float]:
    """α_t of every member: ΔKLD_g(ref) / Σ e_t(ref) over its group (a tensor alone: ΔKLD_t / e_t)."""
    alpha = {}
    for group in groups:
        errors = sum(floor_error[t.hf_name] for t in group.entries)
        alpha.update({t.hf_name: kld[group.name] / errors if errors > 0 else 0.0 for t in group.entries})
    return alpha


def scorer_for(params: PlanParams, imatrix: ImportanceMatrix | None = None,
               sensitivity: CachedSensitivity | None = None) -> Scorer:
    """The scorer of params.score: with the optimized allocator one that predicts every option's ΔKLD
    (PredictingScorer), else one that ranks; the kld score measures through `sensitivity`."""
    if params.score is Score.KLD:
        return KldScorer(params.sensitivity_band, imatrix, sensitivity, params.kld_arithmetic or Arithmetic.WEIGHTS)
    if params.allocator is Allocator.OPTIMIZED:
        if params.score is Score.ERROR:
            return ErrorPredictor(imatrix)
        if params.score is Score.PR15550:
            return Pr15550Predictor(imatrix)
        if params.score is Score.RANDOM:
            return RandomPredictor(imatrix, params.seed)
        return EntropyPredictor(imatrix)
    if params.score is Score.ERROR:
        return ErrorScorer(imatrix)
    if params.score is Score.RANDOM:
        return RandomScorer(params.seed)
    if params.score is Score.PR15550:
        raise UserError("--score pr15550 has no ranked form: it goes with the optimized allocator")
    return EntropyScorer()
