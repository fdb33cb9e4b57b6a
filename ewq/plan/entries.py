"""The plan's entries and their vocabulary: what a plan says of each tensor and block, its parameters and hash.

A plan holds one TensorEntry per floating-point tensor of the model (its statistics, the score
it was ranked by, and what was decided: a bitsandbytes precision and a llama.cpp type, with the
reason) and one BlockEntry per transformer block. The types themselves are ewq.quant_types; what a
plan reports of itself is reports.py; how entries are scored lives in `scores.py`, how they are
decided in `threshold.py` / `budget.py`, files in `files.py`. Keep-rules (applied once, when an entry
is read: create.py) and the parameter-weighted aggregation over tensors are written here, once.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from typing import Callable, Hashable, Iterable

from ..quant_types import VECTOR_TYPE, Arithmetic, LlamaType, Precision, bnb_bits, never_quantized, parse_type
from .reports import BudgetReport, PlanSummary, PrecisionCount

SCHEMA_VERSION = 1


class Score(str, Enum):
    """What a size-budget plan ranks matrices by (see scores.py)."""
    ENTROPY = "entropy"
    ERROR = "error"
    RANDOM = "random"
    KLD = "kld"  # predicted ΔKLD per type from measured sensitivity (ewq.sensitivity): a Lagrangian allocation
    PR15550 = "pr15550"  # llama.cpp PR #15550's weighting of the error: rows x a boost per tensor kind (scores.py)


class Reason(str, Enum):
    """Why a tensor got its precision and type (the plan file's `reason`)."""
    VECTOR = "keep:vector"
    LLAMA_CPP = "keep:llama.cpp"  # a matrix llama.cpp never quantizes (llamacpp.types.never_quantized): F32
    EMBEDDING = "keep:embedding"
    LM_HEAD = "keep:lm_head"
    SMALL = "keep:small"
    TENSOR_ENTROPY = "tensor-entropy"
    BLOCK_ENTROPY = "block-entropy"
    BUDGET_ENTROPY = "budget:entropy"
    BUDGET_ERROR = "budget:error"
    BUDGET_RANDOM = "budget:random"
    BUDGET_KLD = "budget:kld"
    BUDGET_PR15550 = "budget:pr15550"

    @classmethod
    def budget(cls, score: Score) -> "Reason":
        return cls(f"budget:{score.value}")

    @property
    def is_keep(self) -> bool:
        return self.value.startswith("keep:")


class Allocator(str, Enum):
    """How a size-budget plan chooses types (allocate.py)."""
    OPTIMIZED = "optimized"  # predicted ΔKLD α_t·e_t(q) over the wide menu, Lagrangian; every score
    RANKED = "ranked"  # rank-ordered rounds on the 5-rung ladder: how entropy/error/random plans were made


def legacy_allocator(score: "Score") -> "Allocator":
    """What a budget plan without an `allocator` field was made with (plans written before it existed)."""
    return Allocator.OPTIMIZED if score in (Score.KLD, Score.PR15550) else Allocator.RANKED


class Granularity(str, Enum):
    """The level the threshold rule decides at (a plan records both)."""
    BLOCK = "block"
    TENSOR = "tensor"


class Rule(str, Enum):
    """How a plan decides (see threshold.py and budget.py)."""
    THRESHOLD = "threshold"
    BUDGET = "budget"


_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "token_embd")


@dataclass(frozen=True)
class PlanParams:
    granularity: Granularity = Granularity.TENSOR
    entropy_factor: float = 0.65
    fp16_factor: float = 1.0
    bins: int = 256
    keep_embeddings: bool = True
    keep_lm_head: bool = True
    min_params: int = 0
    # size-budget plans (budget.py); None/defaults = the threshold rule (threshold.py)
    target_bpw: float | None = None
    target_bytes: int | None = None
    score: Score = Score.ENTROPY
    seed: int = 0
    imatrix_digest: str | None = None
    # --score kld: the calibration windows its sensitivities are measured on (measure.CalibrationSpec)
    calibration_windows: int | None = None
    calibration_context: int | None = None
    # --score kld: layers per measured group (tensor kind x band of layers, quantized at once); None = each tensor
    sensitivity_band: int | None = None
    # size-budget plans: how types are chosen; None in a file written before it existed (legacy_allocator)
    allocator: Allocator | None = None
    # --score kld: the measurement's compute dtype where it is not float32 (bfloat16, float16)
    measure_dtype: str | None = None
    # --score kld: whose matmuls its predictions model, cpu or cuda (quant_types.Arithmetic); None = the
    # weights' error alone, as kld plans were made before
    kld_arithmetic: Arithmetic | None = None
    # --score kld with a budget: one correction round whose groups are each tensor kind over bands of this
    # many layers (1: each tensor), measured in the context of the first allocation (create.correct); None = none
    correction_band: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        object.__setattr__(self, "score", Score(self.score))
        if self.score is Score.KLD:  # 2 windows of 512 tokens unless given
            object.__setattr__(self, "calibration_windows", self.calibration_windows or 2)
            object.__setattr__(self, "calibration_context", self.calibration_context or 512)
        arithmetic = Arithmetic(self.kld_arithmetic) if self.kld_arithmetic else None
        object.__setattr__(self, "kld_arithmetic", None if self.score is not Score.KLD or arithmetic is
                           Arithmetic.WEIGHTS else arithmetic)
        if self.score is not Score.KLD or not self.is_budget:
            object.__setattr__(self, "correction_band", None)  # it corrects measured sensitivities under a budget
        if self.sensitivity_band == 1:  # a band of one layer is a tensor alone
            object.__setattr__(self, "sensitivity_band", None)
        if self.is_budget:
            object.__setattr__(self, "allocator", Allocator(self.allocator or legacy_allocator(self.score)))
        elif self.allocator is not None:
            object.__setattr__(self, "allocator", None)  # the threshold rule allocates nothing

    @property
    def rule(self) -> Rule:
        return Rule.BUDGET if self.target_bpw is not None or self.target_bytes is not None else Rule.THRESHOLD

    @property
    def is_budget(self) -> bool:
        return self.rule is Rule.BUDGET

    def to_json(self) -> dict:
        """The plan file's `params`; the kld-only fields and the allocator only where set, so that other
        plans keep their bytes."""
        out = {**asdict(self), "granularity": self.granularity.value, "score": self.score.value,
               "allocator": self.allocator.value if self.allocator else None,
               "kld_arithmetic": self.kld_arithmetic.value if self.kld_arithmetic else None}
        return {key: value for key, value in out.items() if key not in _OPTIONAL or value is not None}


_OPTIONAL = ("calibration_windows", "calibration_context", "sensitivity_band", "allocator", "measure_dtype",
             "kld_arithmetic", "correction_band")
# Parameters added after schema 1 plans were written: left out of the plan hash while at their
# defaults, so that earlier plans keep their hash (and file name).
_LATER_PARAMS = {"target_bpw": None, "target_bytes": None, "score": "entropy", "seed": 0, "imatrix_digest": None,
                 "calibration_windows": None, "calibration_context": None, "sensitivity_band": None,
                 "measure_dtype": None, "kld_arithmetic": None, "correction_band": None}


def plan_hash(model_hash: str, params: PlanParams) -> str:
    """16 hex digits naming the plan's file: the model and every parameter but those at the value a plan
    had before the parameter existed (so that earlier plans keep their hash)."""
    values = {key: value for key, value in params.to_json().items()
              if key not in _LATER_PARAMS or value != _LATER_PARAMS[key]}
    if params.allocator is legacy_allocator(params.score):
        values.pop("allocator", None)
    payload = json.dumps({"model": model_hash, **values}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Thresholds:
    """The threshold rule's cut points over one level's scores (threshold.py)."""
    mean: float
    std: float
    fp16_at_or_above: float
    int4_below: float
    n: int

    @classmethod
    def from_scores(cls, scores: list[float], params: PlanParams) -> "Thresholds":
        if not scores:
            return cls(0.0, 0.0, float("inf"), float("-inf"), 0)
        mean = statistics.fmean(scores)
        std = statistics.pstdev(scores)
        return cls(mean, std, mean + params.fp16_factor * std, mean - params.entropy_factor * std, len(scores))

    def tier(self, score: float) -> Precision:
        if score >= self.fp16_at_or_above:
            return Precision.FP16
        if score >= self.int4_below:
            return Precision.INT8
        return Precision.INT4


@dataclass
class TensorEntry:
    hf_name: str
    gguf_name: str | None
    block: int | None
    shape: list[int]
    dtype: str
    numel: int
    entropy_bits: float
    std: float
    max_abs_over_std: float
    excess_kurtosis: float
    precision: Precision = Precision.FP16
    llama_type: LlamaType = LlamaType.F16
    reason: Reason | None = None  # set by the decision
    rank_score: float | None = None  # the score a size-budget plan ranked this tensor by
    # a stack of MoE experts (ewq.experts): the checkpoint's per-expert matrices, in expert order,
    # that llama.cpp stacks into this one tensor (shape [experts, out, in]); None for a tensor of its own
    experts: list[str] | None = None
    # a part of a checkpoint matrix that llama.cpp's converter rearranges (ewq.rearranged): that
    # matrix's name (hf_name is `<source>:<gguf_name>`, shape as written); None for a tensor of its own
    source: str | None = None

    def __post_init__(self):
        self.precision = Precision(self.precision)
        self.llama_type = parse_type(self.llama_type)
        self.reason = None if self.reason in (None, "") else Reason(self.reason)

    @property
    def is_matrix(self) -> bool:
        """A matrix, a stack of expert matrices or a part of a rearranged one: what a plan quantizes
        (not biases, which llama-quantize never quantizes, whatever their shape: per-expert ones are 2-D)."""
        if (self.gguf_name or "").endswith(".bias"):
            return False
        return len(self.shape) == 2 or bool(self.experts) or (bool(self.source) and len(self.shape) >= 2)

    @property
    def is_kept(self) -> bool:
        """A keep-rule holds it (apply_keep_rule): no decision ranks it."""
        return self.reason is not None and self.reason.is_keep

    @property
    def is_bnb_linear(self) -> bool:
        """A matrix that bitsandbytes can hold: an nn.Linear weight (not the embedding or head, not a
        stack of experts, which transformers fuses into 3-D parameters, not a part of a matrix)."""
        return self.is_matrix and not self.is_embedding_or_head and not self.experts and not self.source

    @property
    def ncols(self) -> int:
        return self.shape[-1]

    @property
    def is_embedding(self) -> bool:
        return any(key in self.hf_name for key in _EMBEDDING_NAMES)

    @property
    def is_lm_head(self) -> bool:
        return self.hf_name.startswith("lm_head") or self.gguf_name == "output.weight"

    @property
    def is_embedding_or_head(self) -> bool:
        return self.is_embedding or self.is_lm_head

    def to_json(self) -> dict:
        """The plan file's entry; `experts` only on a stack and `source` only on a part, so that other
        plans keep their bytes."""
        out = {**asdict(self), "precision": self.precision.value, "llama_type": self.llama_type.value,
               "reason": self.reason.value if self.reason else ""}
        for optional in ("experts", "source"):
            if not out[optional]:
                del out[optional]
        return out


@dataclass
class BlockEntry:
    index: int
    entropy_bits: float
    numel: int
    precision: Precision

    def __post_init__(self):
        self.precision = Precision(self.precision)

    def to_json(self) -> dict:
        return {**asdict(self), "precision": self.precision.value}


@dataclass
class Plan:
    model_id: str
    model_hash: str
    model_type: str
    params: PlanParams
    tensors: list[TensorEntry]
    blocks: list[BlockEntry]
    thresholds: dict[str, Thresholds]
    budget: BudgetReport | None = None  # what a size-budget plan reached (budget.decide)
    created_unix: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    @property
    def plan_hash(self) -> str:
        return plan_hash(self.model_hash, self.params)

    def tensor(self, hf_name: str) -> TensorEntry | None:
        return self._by_name.get(hf_name)

    @cached_property
    def _by_name(self) -> dict[str, TensorEntry]:
        return {t.hf_name: t for t in self.tensors}

    def summary(self) -> PlanSummary:
        counts = {p.value: [0, 0] for p in Precision}  # tensors, params
        for t in self.tensors:
            if t.is_matrix:
                counts[t.precision.value][0] += 1
                counts[t.precision.value][1] += t.numel
        total = sum(t.numel for t in self.tensors)
        gguf_bits = sum(t.numel * t.llama_type.bits_per_weight for t in self.tensors)
        bnb_bits = sum(t.numel * bnb_bits_per_weight(t) for t in self.tensors)
        return PlanSummary(
            matrices_by_precision={p: PrecisionCount(*c) for p, c in counts.items()},
            blocks_by_precision={p.value: sum(b.precision == p for b in self.blocks) for p in Precision},
            total_params=total, gguf_bits_per_weight=gguf_bits / max(total, 1),
            bnb_bits_per_weight=bnb_bits / max(total, 1), gguf_bytes=int(gguf_bits / 8), bnb_bytes=int(bnb_bits / 8))


@dataclass
class Decision:
    """What a decision (threshold.decide, budget.decide) returns beside the entries it fills in."""
    blocks: list[BlockEntry]
    thresholds: dict[str, Thresholds]
    budget: BudgetReport | None = None  # what a size-budget plan reached


# --- rules shared by every decision ---------------------------------------------------------------

def keep_reason(t: TensorEntry, params: PlanParams) -> Reason | None:
    """The keep-rule that holds `t` out of any decision (vectors in F32, the rest in F16), or None."""
    if not t.is_matrix:
        return Reason.VECTOR
    if never_quantized(t.gguf_name):
        return Reason.LLAMA_CPP
    if params.keep_embeddings and t.is_embedding:
        return Reason.EMBEDDING
    if params.keep_lm_head and t.is_lm_head:
        return Reason.LM_HEAD
    if t.numel < params.min_params:
        return Reason.SMALL
    return None


def apply_keep_rule(t: TensorEntry, params: PlanParams) -> None:
    """The one place keep-rules are applied (when an entry is read): vectors and what llama.cpp never
    quantizes stay in its F32, kept matrices in F16, with the rule as reason (TensorEntry.is_kept)."""
    reason = keep_reason(t, params)
    if reason is not None:
        t.precision, t.reason = Precision.FP16, reason
        t.llama_type = VECTOR_TYPE if reason in (Reason.VECTOR, Reason.LLAMA_CPP) else LlamaType.F16


def numel_by(entries: Iterable[TensorEntry], key: Callable[[TensorEntry], Hashable]) -> dict:
    """Parameters per key(entry), in first-seen order: e.g. per block, or per precision."""
    out: dict = {}
    for t in entries:
        out[key(t)] = out.get(key(t), 0) + t.numel
    return out


def param_weighted_mean(entries: list[TensorEntry], value: Callable[[TensorEntry], float]) -> float:
    """Σ value·numel / Σ numel: a block's or a unit's score from its tensors'. A plain sum in the
    entries' order, so that plan files keep their bytes."""
    return sum(value(t) * t.numel for t in entries) / sum(t.numel for t in entries)


def bnb_bits_per_weight(t: TensorEntry) -> float:
    return bnb_bits(t.precision, t.ncols) if t.is_matrix else 16.0

