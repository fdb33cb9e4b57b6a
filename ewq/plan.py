"""The quantization plan: data model, decision rule, and JSON I/O.

Decision rule (scores are entropies in bits; mean and std over the scored units of one level):
    score >= mean + fp16_factor * std             -> fp16  (kept)
    mean - entropy_factor * std <= score < ...    -> 8-bit
    score <  mean - entropy_factor * std          -> 4-bit
Low entropy (values crowded into few histogram bins) is taken as "compresses well" and is
quantized harder; that is the EWQ hypothesis, which this tool applies, not proves.
Keep-rules override the rule: vectors (norms, biases) always, embeddings, lm_head and tensors
under `min_params` parameters on request.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path

from . import llamacpp
from .entropy import ENTROPY_FORMULA
from .errors import UserError

SCHEMA_VERSION = 1
PLAN_PREFIX, SCRIPT_PREFIX = "quant_plan_", "quantize_command_"


class Precision(str, Enum):
    FP16 = "fp16"
    INT8 = "8bit"
    INT4 = "4bit"


class Granularity(str, Enum):
    BLOCK = "block"
    TENSOR = "tensor"


# llama.cpp type per precision, best first; the first whose block divides the row length is used.
LLAMA_TYPES = {
    Precision.FP16: ("F16",),
    Precision.INT8: ("Q8_0",),
    Precision.INT4: ("Q4_K", "Q4_0"),
}
VECTOR_LLAMA_TYPE = "F32"  # llama.cpp keeps 1-D tensors in F32
# bitsandbytes storage, bits per weight: int8 + one fp32 scale per row; nf4 in blocks of 64 with
# double-quantized absmax (8-bit absmax per block + fp32 per 256 blocks).
BNB_NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)

BUDGET_RULE = ("size budget (ewq.budget): matrices ranked by `score`, highest first, lifted one rung at a time "
               "in rounds while the budget allows; GGUF ladder Q4_K/Q5_K/Q6_K/Q8_0/F16 (Q4_0/Q5_0 where K blocks "
               "do not divide rows), bitsandbytes ladder nf4/int8/fp16; the thresholds below are recorded only")
_BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")
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
    # size-budget plans (ewq.budget); None/defaults = the threshold rule above
    target_bpw: float | None = None
    target_bytes: int | None = None
    score: str = "entropy"
    seed: int = 0
    imatrix_digest: str | None = None

    @property
    def is_budget(self) -> bool:
        return self.target_bpw is not None or self.target_bytes is not None


# Parameters added after schema 1 plans were written: left out of the plan hash while at their
# defaults, so that earlier plans keep their hash (and file name).
_LATER_PARAMS = {"target_bpw": None, "target_bytes": None, "score": "entropy", "seed": 0, "imatrix_digest": None}


@dataclass(frozen=True)
class Thresholds:
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
    llama_type: str = "F16"
    reason: str = ""
    rank_score: float | None = None  # the score a size-budget plan ranked this tensor by

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def ncols(self) -> int:
        return self.shape[-1]


@dataclass
class BlockEntry:
    index: int
    entropy_bits: float
    numel: int
    precision: Precision


@dataclass
class Plan:
    model_id: str
    model_hash: str
    model_type: str
    params: PlanParams
    tensors: list[TensorEntry]
    blocks: list[BlockEntry]
    thresholds: dict[str, Thresholds]
    budget: dict | None = None  # what a size-budget plan reached (ewq.budget.assign)
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

    def summary(self) -> dict:
        counts = {p.value: {"tensors": 0, "params": 0} for p in Precision}
        gguf_bits = bnb_bits = 0.0
        total = 0
        for t in self.tensors:
            total += t.numel
            if t.is_matrix:
                counts[t.precision.value]["tensors"] += 1
                counts[t.precision.value]["params"] += t.numel
            gguf_bits += t.numel * llamacpp.bits_per_weight(llamacpp.parse_type(t.llama_type))
            bnb_bits += t.numel * bnb_bits_per_weight(t)
        return {
            "matrices_by_precision": counts,
            "blocks_by_precision": {p.value: sum(b.precision == p for b in self.blocks) for p in Precision},
            "total_params": total,
            "estimated_bits_per_weight": {"gguf": gguf_bits / max(total, 1), "bitsandbytes": bnb_bits / max(total, 1)},
            "estimated_bytes": {"gguf": int(gguf_bits / 8), "bitsandbytes": int(bnb_bits / 8)},
        }

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "plan_hash": self.plan_hash,
            "created_unix": self.created_unix,
            "model": {"id": self.model_id, "hash": self.model_hash, "model_type": self.model_type},
            "entropy": {"formula": ENTROPY_FORMULA, "bins": self.params.bins, "unit": "bits",
                        "block_score": "parameter-weighted mean of the block's matrix entropies"},
            "params": {**asdict(self.params), "granularity": self.params.granularity.value},
            "decision_rule": {
                "rule": "budget" if self.params.is_budget else "threshold",
                "budget": BUDGET_RULE if self.params.is_budget else None,
                "fp16": "score >= mean + fp16_factor*std",
                "8bit": "mean - entropy_factor*std <= score < mean + fp16_factor*std",
                "4bit": "score < mean - entropy_factor*std",
                "thresholds": {level: asdict(th) for level, th in self.thresholds.items()},
            },
            "summary": self.summary(),
            "budget": self.budget,
            "blocks": [{**asdict(b), "precision": b.precision.value} for b in self.blocks],
            "tensors": [{**asdict(t), "precision": t.precision.value} for t in self.tensors],
        }


def bnb_bits_per_weight(t: TensorEntry) -> float:
    return bnb_bits(t.precision, t.ncols) if t.is_matrix else 16.0


def bnb_bits(precision: Precision, ncols: int) -> float:
    """bitsandbytes storage of a matrix with rows of `ncols` values, per weight."""
    if precision is Precision.FP16:
        return 16.0
    if precision is Precision.INT8:
        return 8.0 + 32.0 / ncols
    return BNB_NF4_BITS


def plan_hash(model_hash: str, params: PlanParams) -> str:
    values = {key: value for key, value in asdict(params).items()
              if key not in _LATER_PARAMS or value != _LATER_PARAMS[key]}
    payload = json.dumps({"model": model_hash, **values, "granularity": params.granularity.value}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def block_index(hf_name: str) -> int | None:
    match = _BLOCK_INDEX.search(hf_name)
    return int(match.group(1)) if match else None


def is_embedding(t: TensorEntry) -> bool:
    return any(key in t.hf_name for key in _EMBEDDING_NAMES)


def is_lm_head(t: TensorEntry) -> bool:
    return t.hf_name.startswith("lm_head") or t.gguf_name == "output.weight"


def is_embedding_or_head(t: TensorEntry) -> bool:
    return is_embedding(t) or is_lm_head(t)


def keep_reason(t: TensorEntry, params: PlanParams) -> str | None:
    if not t.is_matrix:
        return "keep:vector"
    if params.keep_embeddings and is_embedding(t):
        return "keep:embedding"
    if params.keep_lm_head and is_lm_head(t):
        return "keep:lm_head"
    if t.numel < params.min_params:
        return "keep:small"
    return None


def llama_type_for(precision: Precision, t: TensorEntry) -> str:
    if not t.is_matrix:
        return VECTOR_LLAMA_TYPE
    for name in LLAMA_TYPES[precision]:
        if llamacpp.fits_rows(llamacpp.parse_type(name), t.ncols):
            return name
    return "F16"  # no block size divides the row: llama.cpp would fall back to F16 too


def decide(tensors: list[TensorEntry], params: PlanParams) -> tuple[list[BlockEntry], dict[str, Thresholds]]:
    """Fill precision, llama_type and reason of every tensor; return block entries and thresholds."""
    kept = {t.hf_name: keep_reason(t, params) for t in tensors}
    scored = [t for t in tensors if kept[t.hf_name] is None]

    block_numel: dict[int, int] = {}
    block_weighted: dict[int, float] = {}
    for t in scored:
        if t.block is not None:
            block_numel[t.block] = block_numel.get(t.block, 0) + t.numel
            block_weighted[t.block] = block_weighted.get(t.block, 0.0) + t.entropy_bits * t.numel
    block_scores = {b: block_weighted[b] / block_numel[b] for b in sorted(block_numel)}

    tensor_th = Thresholds.from_scores([t.entropy_bits for t in scored], params)
    block_th = Thresholds.from_scores(list(block_scores.values()), params)
    blocks = [BlockEntry(b, s, block_numel[b], block_th.tier(s)) for b, s in block_scores.items()]
    block_precision = {b.index: b.precision for b in blocks}

    for t in tensors:
        reason = kept[t.hf_name]
        if reason is not None:
            t.precision, t.reason = Precision.FP16, reason
        elif params.granularity is Granularity.BLOCK and t.block is not None:
            t.precision, t.reason = block_precision[t.block], "block-entropy"
        else:
            t.precision, t.reason = tensor_th.tier(t.entropy_bits), "tensor-entropy"
        t.llama_type = llama_type_for(t.precision, t)
    return blocks, {"tensor": tensor_th, "block": block_th}


# --- file I/O --------------------------------------------------------------------------------

def plan_path(out_dir: Path, plan_hash_: str) -> Path:
    return Path(out_dir) / f"{PLAN_PREFIX}{plan_hash_}.json"


def script_path(out_dir: Path, plan_hash_: str) -> Path:
    return Path(out_dir) / f"{SCRIPT_PREFIX}{plan_hash_}.sh"


_TENSOR_FIELDS = {name for name, f in TensorEntry.__dataclass_fields__.items()
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def plan_from_json(data: dict, source: str) -> Plan:
    """Validate and rebuild a plan; any problem is a UserError naming the file."""
    def bad(why: str) -> UserError:
        return UserError(f"plan {source} is invalid: {why}")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise bad(f"schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}")
    try:
        model, raw_params, raw_tensors = data["model"], data["params"], data["tensors"]
        params = PlanParams(**{**raw_params, "granularity": Granularity(raw_params["granularity"])})
        tensors = []
        for raw in raw_tensors:
            missing = _TENSOR_FIELDS - raw.keys()
            if missing:
                raise bad(f"tensor entry {raw.get('hf_name', '?')} misses {sorted(missing)}")
            tensors.append(TensorEntry(**{**raw, "precision": Precision(raw["precision"])}))
            llamacpp.parse_type(tensors[-1].llama_type)
        blocks = [BlockEntry(**{**b, "precision": Precision(b["precision"])}) for b in data["blocks"]]
        thresholds = {k: Thresholds(**v) for k, v in data["decision_rule"]["thresholds"].items()}
        plan = Plan(model_id=model["id"], model_hash=model["hash"], model_type=model["model_type"], params=params,
                    tensors=tensors, blocks=blocks, thresholds=thresholds, budget=data.get("budget"),
                    created_unix=data["created_unix"])
    except UserError as error:
        raise bad(str(error).removeprefix(f"plan {source} is invalid: ")) from None
    except (KeyError, TypeError, ValueError) as error:
        raise bad(f"{type(error).__name__}: {error}") from None
    if data.get("plan_hash") != plan.plan_hash:
        raise bad("plan_hash does not match its model hash and parameters (edited by hand?)")
    return plan


def load_plan(path: Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"plan {path} is not valid JSON: {error}") from None
    return plan_from_json(data, str(path))


def find_plan(out_dir: Path, model_hash: str) -> Path:
    """The newest plan in out_dir made for this model hash."""
    candidates = []
    for path in Path(out_dir).glob(f"{PLAN_PREFIX}*.json"):
        try:
            data = json.loads(path.read_text())
            if data.get("model", {}).get("hash") == model_hash:
                candidates.append((data.get("created_unix", 0), path))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
    if not candidates:
        raise UserError(f"no plan for model hash {model_hash} in {out_dir}; run create_quantization_plan.py first")
    return max(candidates)[1]


def plan_for_model(model_hash: str, plan_file: Path | None, plans_dir: Path) -> tuple[Path, Plan]:
    """The given plan, or the newest one in plans_dir for this model; refused if made for another model."""
    path = Path(plan_file) if plan_file else find_plan(plans_dir, model_hash)
    plan = load_plan(path)
    if plan.model_hash != model_hash:
        raise UserError(f"plan {path} was made for model hash {plan.model_hash}, not this model ({model_hash})")
    return path, plan
