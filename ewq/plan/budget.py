"""Size-budget plans: give each matrix a rung of a type ladder so that the whole model fits a budget.

One rule for every score, so that scores can be compared at equal size:
  1. every ranked matrix starts on the lowest rung of its ladder; fixed tensors (the keep-rules:
     vectors in F32, kept matrices in F16) are charged first; a budget below that floor is refused;
  2. matrices are ordered by score (scores.py), highest first;
  3. in rounds, walk that order and lift each matrix one rung if the extra bits still fit; stop
     after a round that lifted nothing.
The result never exceeds the budget and misses it by less than the cheapest remaining lift.
GGUF ladder: Q4_K, Q5_K, Q6_K, Q8_0, F16; where K-quant blocks (256) do not divide a row the
legacy type of the same size is used (Q4_0, Q5_0) and Q6_K, which has none, is skipped.
bitsandbytes ladder: nf4, int8, fp16, over the matrices it can replace (nn.Linear in blocks; not
the embedding, the head or a stack of MoE experts).
The thresholds and block entropies of the threshold rule are recorded in every plan; here a
block's precision is the bitsandbytes precision that holds most of its parameters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from ..llamacpp.types import LlamaType
from . import distortion, threshold
from .model import Decision, PlanParams, Precision, Reason, Score, TensorEntry, bnb_bits, keep, keep_reason, numel_by
from .optimize import Option, optimize

if TYPE_CHECKING:
    from .scores import Scores

GGUF_LADDER = (LlamaType.Q4_K, LlamaType.Q5_K, LlamaType.Q6_K, LlamaType.Q8_0, LlamaType.F16)
LEGACY_SAME_SIZE = {LlamaType.Q4_K: LlamaType.Q4_0, LlamaType.Q5_K: LlamaType.Q5_0}
BNB_LADDER = (Precision.INT4, Precision.INT8, Precision.FP16)
RANK_RULE_TEXT = ("size budget (ewq.plan.budget): matrices ranked by `score`, highest first, lifted one rung at a "
                  "time in rounds while the budget allows; GGUF ladder Q4_K/Q5_K/Q6_K/Q8_0/F16 (Q4_0/Q5_0 where K "
                  "blocks do not divide rows), bitsandbytes ladder nf4/int8/fp16; the thresholds below are recorded only")
KLD_RULE_TEXT = ("size budget (ewq.plan.budget, score kld): predicted ΔKLD_t(q) = α_t·e_t(q), α_t the measured KLD when "
                 "only t is on its reference type (ewq.plan.measure) over its relative error there, e_t(q) the "
                 "importance-weighted relative error of type q; minimise Σ predicted ΔKLD subject to Σ exact bytes <= "
                 "budget (ewq.plan.optimize: convex hull per tensor, Lagrangian bisection, greedy fill, polish); GGUF "
                 "options Q3_K/IQ4_XS/Q4_0/IQ4_NL/Q4_K/Q4_1/Q5_0/Q5_K/Q5_1/Q6_K/Q8_0/F16 where their blocks divide "
                 "the rows, bitsandbytes nf4/int8/fp16; the thresholds below are recorded only")


def rule_text(params: PlanParams) -> str:
    return KLD_RULE_TEXT if params.score is Score.KLD else RANK_RULE_TEXT


def gguf_ladder(entry: TensorEntry) -> list[LlamaType]:
    rungs = []
    for llama_type in GGUF_LADDER:
        if not llama_type.fits_rows(entry.ncols):
            llama_type = LEGACY_SAME_SIZE.get(llama_type)
            if llama_type is None or not llama_type.fits_rows(entry.ncols):
                continue
        if llama_type not in rungs:
            rungs.append(llama_type)
    return rungs or [LlamaType.F16]


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


def budget_bits(tensors: list[TensorEntry], params: PlanParams) -> float:
    if params.target_bpw is not None:
        return params.target_bpw * sum(t.numel for t in tensors)
    return params.target_bytes * 8


def decide(tensors: list[TensorEntry], params: PlanParams, scores: Scores) -> Decision:
    """Set llama_type (GGUF) and precision (bitsandbytes) of every tensor for the budget: rank-ordered
    rounds on the ladders for rank-only scores, the Lagrangian optimization of predicted distortion
    over exact bytes (optimize.py) where the scorer predicts it (kld)."""
    recorded = threshold.decide(tensors, params)  # thresholds and block entropies, recorded only
    budget = budget_bits(tensors, params)
    total = sum(t.numel for t in tensors)
    gguf_fixed = bnb_fixed = 0.0
    gguf_ranked, bnb_ranked = [], []
    for t in tensors:
        reason = keep_reason(t, params)
        if reason is not None:
            keep(t, reason)
            gguf_fixed += t.numel * t.llama_type.bits_per_weight
            bnb_fixed += t.numel * 16
            continue
        t.reason, t.rank_score = Reason.budget(params.score), scores.rank[t.hf_name]
        gguf_ranked.append(t)
        if not t.is_bnb_linear:
            t.precision = Precision.FP16  # bitsandbytes replaces nn.Linear only
            bnb_fixed += t.numel * 16
        else:
            bnb_ranked.append(t)

    if scores.gguf is None:
        gguf_options = [gguf_ladder(t) for t in gguf_ranked]
        gguf_levels = _rounds(gguf_ranked, [[t.numel * o.bits_per_weight for o in options]
                                            for t, options in zip(gguf_ranked, gguf_options)], scores, budget - gguf_fixed)
    else:
        gguf_options = [distortion.gguf_options(t) for t in gguf_ranked]
        gguf_levels = _optimized(gguf_ranked, gguf_options, distortion.gguf_bytes, scores.gguf, budget - gguf_fixed)
    if gguf_levels is None:
        floor = gguf_fixed + sum(t.numel * min(o.bits_per_weight for o in options)
                                 for t, options in zip(gguf_ranked, gguf_options))
        raise UserError(f"the budget ({budget / total:.3f} bits/weight) is below the GGUF ladder's floor "
                        f"({floor / total:.3f} bits/weight with the kept tensors); raise it or drop keep-rules "
                        "(--no-keep-embeddings / --no-keep-lm-head)")
    for t, options, level in zip(gguf_ranked, gguf_options, gguf_levels):
        t.llama_type = options[level]

    bnb_options = [BNB_LADDER] * len(bnb_ranked)
    bnb_floor = bnb_fixed + sum(t.numel * bnb_bits(BNB_LADDER[0], t.ncols) for t in bnb_ranked)
    feasible = bnb_floor <= budget
    if not feasible:
        bnb_levels = [0] * len(bnb_ranked)
    elif scores.bnb is None:
        bnb_levels = _rounds(bnb_ranked, [[t.numel * bnb_bits(p, t.ncols) for p in BNB_LADDER] for t in bnb_ranked],
                             scores, budget - bnb_fixed)
    else:
        bnb_levels = _optimized(bnb_ranked, bnb_options, distortion.bnb_bytes, scores.bnb, budget - bnb_fixed)
    for t, level in zip(bnb_ranked, bnb_levels):
        t.precision = BNB_LADDER[level]

    for block in recorded.blocks:
        held = numel_by((t for t in tensors if t.block == block.index and t.is_matrix), lambda t: t.precision)
        block.precision = max(held, key=held.get) if held else block.precision

    gguf_total = gguf_fixed + sum(t.numel * t.llama_type.bits_per_weight for t in gguf_ranked)
    bnb_total = bnb_fixed + sum(t.numel * bnb_bits(t.precision, t.ncols) for t in bnb_ranked)
    reached = {
        "budget_bits_per_weight": budget / total,
        "budget_bytes": int(budget // 8),
        "gguf": {"bits_per_weight": gguf_total / total, "bytes": int(gguf_total // 8), "meets_budget": True},
        "bitsandbytes": {"bits_per_weight": bnb_total / total, "bytes": int(bnb_total // 8),
                         "meets_budget": feasible, "floor_bits_per_weight": bnb_floor / total},
    }
    if scores.gguf is not None:
        reached["gguf"]["predicted_kld"] = sum(scores.gguf[t.hf_name][t.llama_type] for t in gguf_ranked)
        if feasible:
            reached["bitsandbytes"]["predicted_kld"] = sum(scores.bnb[t.hf_name][t.precision] for t in bnb_ranked)
    return Decision(recorded.blocks, recorded.thresholds, reached)


def _rounds(ranked: list[TensorEntry], costs: list[list[float]], scores: Scores, budget: float) -> list[int] | None:
    """Rank-ordered rounds (allocate) in bits; None when the floor exceeds the budget."""
    try:
        return allocate(costs, rank_order(ranked, scores.rank), budget)
    except ValueError:
        return None


def _optimized(ranked: list[TensorEntry], options: list, nbytes, predicted: dict, budget_bits: float) -> list[int] | None:
    """The Lagrangian optimization (optimize.py) of predicted ΔKLD over exact bytes; None below the floor."""
    items = [[Option(nbytes(t, o), predicted[t.hf_name][o]) for o in opts] for t, opts in zip(ranked, options)]
    try:
        return optimize(items, int(budget_bits // 8))
    except ValueError:
        return None
