"""Size-budget plans: give each matrix a rung of a type ladder so that the whole model fits a budget.

One rule for every score, so that scores can be compared at equal size:
  1. every ranked matrix starts on the lowest rung of its ladder; fixed tensors (vectors in F32,
     kept tensors in F16) are charged first; a budget below that floor is refused;
  2. matrices are ordered by score, highest first (entropy: high entropy = "needs bits", the EWQ
     hypothesis; error: measured relative 4-bit error; random: a seeded shuffle, the control);
  3. in rounds, walk that order and lift each matrix one rung if the extra bits still fit; stop
     after a round that lifted nothing.
The result never exceeds the budget and misses it by less than the cheapest remaining lift.
GGUF ladder: Q4_K, Q5_K, Q6_K, Q8_0, F16; where K-quant blocks (256) do not divide a row the
legacy type of the same size is used (Q4_0, Q5_0) and Q6_K, which has none, is skipped.
bitsandbytes ladder: nf4, int8, fp16, over the matrices it can replace (nn.Linear in blocks).
"""
from __future__ import annotations

import hashlib
import random
from enum import Enum
from pathlib import Path

from . import llamacpp
from .errors import UserError
from .plan import VECTOR_LLAMA_TYPE, Precision, TensorEntry, bnb_bits, is_embedding_or_head

GGUF_LADDER = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
LEGACY_SAME_SIZE = {"Q4_K": "Q4_0", "Q5_K": "Q5_0"}
BNB_LADDER = (Precision.INT4, Precision.INT8, Precision.FP16)


class Score(str, Enum):
    ENTROPY = "entropy"
    ERROR = "error"
    RANDOM = "random"


def gguf_ladder(entry: TensorEntry) -> list[str]:
    rungs = []
    for name in GGUF_LADDER:
        if not llamacpp.fits_rows(llamacpp.parse_type(name), entry.ncols):
            name = LEGACY_SAME_SIZE.get(name)
            if name is None or not llamacpp.fits_rows(llamacpp.parse_type(name), entry.ncols):
                continue
        if name not in rungs:
            rungs.append(name)
    return rungs or ["F16"]


def gguf_bits(type_name: str) -> float:
    return llamacpp.bits_per_weight(llamacpp.parse_type(type_name))


def allocate(costs: list[list[float]], order: list[int], budget: float) -> list[int]:
    """Rung index per item: rank-ordered rounds of one-rung lifts while they fit (see module doc).
    costs[i][r] is the cost of item i on rung r (increasing in r)."""
    levels = [0] * len(costs)
    spent = sum(c[0] for c in costs)
    if spent > budget:
        raise ValueError(f"floor {spent:.0f} exceeds budget {budget:.0f}")
    lifted = True
    while lifted:
        lifted = False
        for i in order:
            if levels[i] + 1 < len(costs[i]):
                extra = costs[i][levels[i] + 1] - costs[i][levels[i]]
                if spent + extra <= budget:
                    levels[i] += 1
                    spent += extra
                    lifted = True
    return levels


def rank_order(entries: list[TensorEntry], scores: dict[str, float]) -> list[int]:
    """Indices of entries, highest score first; ties by name so the order is reproducible."""
    return sorted(range(len(entries)), key=lambda i: (-scores[entries[i].hf_name], entries[i].hf_name))


def random_scores(entries: list[TensorEntry], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {t.hf_name: rng.random() for t in sorted(entries, key=lambda t: t.hf_name)}


def assign(tensors: list[TensorEntry], kept: dict[str, str | None], scores: dict[str, float],
           score: Score, budget_bits: float) -> dict:
    """Set llama_type (GGUF ladder) and precision (bitsandbytes ladder) of every tensor for the budget.
    Returns what was reached on each side."""
    total = sum(t.numel for t in tensors)
    gguf_fixed = bnb_fixed = 0.0
    gguf_ranked, bnb_ranked = [], []
    for t in tensors:
        if not t.is_matrix:
            t.llama_type, t.precision, t.reason = VECTOR_LLAMA_TYPE, Precision.FP16, "keep:vector"
            gguf_fixed += t.numel * gguf_bits(VECTOR_LLAMA_TYPE)
            bnb_fixed += t.numel * 16
            continue
        if kept[t.hf_name] is not None:
            t.llama_type, t.precision, t.reason = "F16", Precision.FP16, kept[t.hf_name]
            gguf_fixed += t.numel * 16
            bnb_fixed += t.numel * 16
            continue
        t.reason = f"budget:{score.value}"
        gguf_ranked.append(t)
        if is_embedding_or_head(t):
            t.precision = Precision.FP16  # bitsandbytes replaces nn.Linear only
            bnb_fixed += t.numel * 16
        else:
            bnb_ranked.append(t)

    gguf_costs = [[t.numel * gguf_bits(name) for name in gguf_ladder(t)] for t in gguf_ranked]
    try:
        levels = allocate(gguf_costs, rank_order(gguf_ranked, scores), budget_bits - gguf_fixed)
    except ValueError:
        floor = gguf_fixed + sum(c[0] for c in gguf_costs)
        raise UserError(f"the budget ({budget_bits / total:.3f} bits/weight) is below the GGUF ladder's floor "
                        f"({floor / total:.3f} bits/weight with the kept tensors); raise it or drop keep-rules "
                        "(--no-keep-embeddings / --no-keep-lm-head)") from None
    for t, level in zip(gguf_ranked, levels):
        t.llama_type = gguf_ladder(t)[level]

    bnb_costs = [[t.numel * bnb_bits(p, t.ncols) for p in BNB_LADDER] for t in bnb_ranked]
    bnb_floor = bnb_fixed + sum(c[0] for c in bnb_costs)
    feasible = bnb_floor <= budget_bits
    bnb_levels = (allocate(bnb_costs, rank_order(bnb_ranked, scores), budget_bits - bnb_fixed) if feasible
                  else [0] * len(bnb_ranked))
    for t, level in zip(bnb_ranked, bnb_levels):
        t.precision = BNB_LADDER[level]

    gguf_total = gguf_fixed + sum(c[level] for c, level in zip(gguf_costs, levels))
    bnb_total = bnb_fixed + sum(c[level] for c, level in zip(bnb_costs, bnb_levels))
    return {
        "budget_bits_per_weight": budget_bits / total,
        "budget_bytes": int(budget_bits // 8),
        "gguf": {"bits_per_weight": gguf_total / total, "bytes": int(gguf_total // 8), "meets_budget": True},
        "bitsandbytes": {"bits_per_weight": bnb_total / total, "bytes": int(bnb_total // 8),
                         "meets_budget": feasible, "floor_bits_per_weight": bnb_floor / total},
    }


# --- the budget as given on the command line ---------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6, "MIB": 2**20,
          "G": 2**30, "GB": 10**9, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'98.9MiB', '104MB', '103668480' -> bytes; or the path of a GGUF file -> its tensor bytes."""
    path = Path(text)
    if path.suffix == ".gguf":
        from .gguf_files import describe

        return int(describe(path)["weight_bytes"])
    number = text.strip().upper().rstrip()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if unit and number.endswith(unit):
            value, factor = number[: -len(unit)], _UNITS[unit]
            break
    else:
        value, factor = number, 1
    try:
        size = float(value) * factor
    except ValueError:
        raise UserError(f"--target-size takes bytes with an optional unit (e.g. 98.9MiB) or a .gguf file, "
                        f"got {text!r}") from None
    if size <= 0:
        raise UserError(f"--target-size must be positive, got {text!r}")
    return int(size)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def floor_error(entry: TensorEntry, tensor, imatrix: dict | None) -> float:
    """The `error` score: relative (importance-weighted) squared error of a matrix on its ladder's
    lowest rung, computed with llama.cpp's quantizer."""
    from . import ggml_quant

    floor = llamacpp.parse_type(gguf_ladder(entry)[0])
    importance = imatrix.get(entry.gguf_name) if imatrix and entry.gguf_name else None
    return ggml_quant.relative_error(tensor.float().numpy(), floor, importance)
