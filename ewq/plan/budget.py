"""Size-budget plans: every ranked matrix takes a type of each target's menu so that the model fits a budget.

Fixed tensors (the keep-rules: vectors in F32, kept matrices in F16) are charged first; the rest
is allocated (allocate.py) for each target in turn, by the same code:
  GGUF          every ranked matrix; menu: the wide menu Q3_K … F16 (quant_types) with the predicted
                ΔKLD of every type (Allocator.OPTIMIZED, every score), or, with --allocator ranked, the
                rank-ordered ladder Q4_K, Q5_K, Q6_K, Q8_0, F16 (legacy Q4_0/Q5_0 where K blocks do not divide rows);
  bitsandbytes  the matrices it can replace (nn.Linear in blocks; not the embedding, the head, a stack
                of MoE experts or a part of a rearranged matrix: those stay fp16); menu nf4, int8, fp16.
A GGUF budget below its floor is refused; a bitsandbytes floor above the budget leaves every
matrix on nf4 and says so (meets_budget false). The thresholds and block entropies of the
threshold rule are recorded in every plan (threshold.record); here a block's precision is the
bitsandbytes precision that holds most of its parameters.
"""
from __future__ import annotations

from typing import Callable, Hashable

from ..errors import UserError
from ..quant_types import Precision
from . import threshold
from .allocate import BITSANDBYTES, GGUF_PREDICTED, GGUF_RANKED, Allocation, Menu, allocate
from .entries import Allocator, Decision, PlanParams, Reason, TensorEntry, numel_by
from .reports import BudgetReport, TargetReport
from .scores import Scores

RANK_RULE_TEXT = ("size budget (ewq.plan.budget): matrices ranked by `score`, highest first, lifted one rung at a "
                  "time in rounds while the budget allows; GGUF ladder Q4_K/Q5_K/Q6_K/Q8_0/F16 (Q4_0/Q5_0 where K "
                  "blocks do not divide rows), bitsandbytes ladder nf4/int8/fp16; the thresholds below are recorded only")
ALPHA = {"kld": "the measured KLD when only t is on its reference type (ewq.sensitivity) over its relative error there",
         "error": "1 (the relative error itself)", "entropy": "t's entropy in bits",
         "random": "uniform in [0, 1), seeded",
         "pr15550": "t's rows times a boost per kind (ffn_down 6, output 3, tied embedding 2.5, attn_v 1.25: "
                    "llama.cpp PR #15550's weighting)"}
OPTIMIZED_RULE_TEXT = ("size budget (ewq.plan.budget, score {score}): predicted ΔKLD_t(q) = α_t·e_t(q), α_t {alpha}, "
                       "e_t(q) the importance-weighted relative error of type q; minimise Σ predicted ΔKLD subject to "
                       "Σ exact bytes <= budget (ewq.plan.optimize: convex hull per tensor, Lagrangian bisection, "
                       "greedy fill, polish); GGUF options Q3_K/IQ4_XS/Q4_0/IQ4_NL/Q4_K/Q4_1/Q5_0/Q5_K/Q5_1/Q6_K/Q8_0/F16 "
                       "where their blocks divide the rows, bitsandbytes nf4/int8/fp16; the thresholds below are "
                       "recorded only")


def rule_text(params: PlanParams) -> str:
    if params.allocator is Allocator.RANKED:
        return RANK_RULE_TEXT
    return OPTIMIZED_RULE_TEXT.format(score=params.score.value, alpha=ALPHA[params.score.value])


def budget_bits(tensors: list[TensorEntry], params: PlanParams) -> float:
    if params.target_bpw is not None:
        return params.target_bpw * sum(t.numel for t in tensors)
    return params.target_bytes * 8


def decide(tensors: list[TensorEntry], params: PlanParams, scores: Scores) -> Decision:
    """Set llama_type (GGUF) and precision (bitsandbytes) of every ranked tensor for the budget."""
    recorded = threshold.record(tensors, params, {t.hf_name: t.entropy_bits for t in tensors})
    budget, total = budget_bits(tensors, params), sum(t.numel for t in tensors)
    ranked = [t for t in tensors if not t.is_kept]
    for t in ranked:
        t.reason, t.rank_score = Reason.budget(params.score), scores.rank[t.hf_name]
    bnb_ranked = [t for t in ranked if t.is_bnb_linear]
    for t in ranked:
        if not t.is_bnb_linear:
            t.precision = Precision.FP16  # bitsandbytes replaces nn.Linear only

    gguf_fixed = sum(t.numel * t.llama_type.bits_per_weight for t in tensors if t.is_kept)
    optimized = params.allocator is Allocator.OPTIMIZED
    gguf_menu = GGUF_PREDICTED if optimized else GGUF_RANKED
    gguf = allocate(ranked, gguf_menu, budget - gguf_fixed, scores.rank, scores.gguf if optimized else None)
    if gguf.choice is None:
        raise UserError(f"the budget ({budget / total:.3f} bits/weight) is below the GGUF ladder's floor "
                        f"({(gguf_fixed + gguf.floor_bits) / total:.3f} bits/weight with the kept tensors); raise "
                        "it or drop keep-rules (--no-keep-embeddings / --no-keep-lm-head)")
    for t in ranked:
        t.llama_type = gguf.choice[t.hf_name]

    allocated = {t.hf_name for t in bnb_ranked}
    bnb_fixed = sum(t.numel * 16 for t in tensors if t.hf_name not in allocated)
    bnb = allocate(bnb_ranked, BITSANDBYTES, budget - bnb_fixed, scores.rank, scores.bnb if optimized else None)
    feasible = bnb.choice is not None
    for t in bnb_ranked:
        t.precision = bnb.choice[t.hf_name] if feasible else Precision.INT4

    for block in recorded.blocks:
        held = numel_by((t for t in tensors if t.block == block.index and t.is_matrix), lambda t: t.precision)
        block.precision = max(held, key=held.get) if held else block.precision
    gguf_reached = _reached(ranked, gguf_menu, lambda t: t.llama_type, gguf, gguf_fixed, total)
    gguf_reached.floor_bits_per_weight = None  # a GGUF budget below its floor was refused above
    report = BudgetReport(budget / total, int(budget // 8), gguf_reached,
                          _reached(bnb_ranked, BITSANDBYTES, lambda t: t.precision, bnb, bnb_fixed, total))
    return Decision(recorded.blocks, recorded.thresholds, report)


def _reached(allocated: list[TensorEntry], menu: Menu, chosen: Callable[[TensorEntry], Hashable],
             allocation: Allocation, fixed: float, total: int) -> TargetReport:
    """What one target reached: the fixed tensors' bits plus every allocated matrix at its chosen option."""
    bits = fixed + sum(menu.bits(t, chosen(t)) for t in allocated)
    return TargetReport(bits / total, int(bits // 8), allocation.choice is not None,
                        (fixed + allocation.floor_bits) / total, allocation.predicted)
