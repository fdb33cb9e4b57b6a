"""The threshold rule: EWQ's original decision, by how far a score lies from the mean.

Over the scored units of one level (tensors, or blocks), with mean μ and std σ of their scores
(entropies in bits; a block's score is the parameter-weighted mean of its matrices'):
    score >= μ + fp16_factor·σ              -> fp16  (kept)
    μ - entropy_factor·σ <= score < ...     -> 8-bit
    score <  μ - entropy_factor·σ           -> 4-bit
Low entropy (values crowded into few histogram bins) is taken as "compresses well" and is
quantized harder; that is the EWQ hypothesis, which this tool applies, not proves.
Keep-rules come first (entries.apply_keep_rule, when an entry is read). Every plan records both
levels' thresholds (record), whatever rule decides.
"""
from __future__ import annotations

from ..quant_types import threshold_type
from .entries import BlockEntry, Decision, Granularity, PlanParams, Reason, TensorEntry, Thresholds, param_weighted_mean

RULE_TEXT = {
    "fp16": "score >= mean + fp16_factor*std",
    "8bit": "mean - entropy_factor*std <= score < mean + fp16_factor*std",
    "4bit": "score < mean - entropy_factor*std",
}


def record(tensors: list[TensorEntry], params: PlanParams, scores: dict[str, float]) -> Decision:
    """Both levels' thresholds over the scores of the ranked tensors (those no keep-rule holds), and
    one BlockEntry per block with its score and its tier; assigns nothing."""
    scored = [t for t in tensors if not t.is_kept]
    by_block: dict[int, list[TensorEntry]] = {}
    for t in scored:
        if t.block is not None:
            by_block.setdefault(t.block, []).append(t)
    block_scores = {b: param_weighted_mean(by_block[b], lambda t: scores[t.hf_name]) for b in sorted(by_block)}
    tensor_th = Thresholds.from_scores([scores[t.hf_name] for t in scored], params)
    block_th = Thresholds.from_scores(list(block_scores.values()), params)
    blocks = [BlockEntry(b, s, sum(t.numel for t in by_block[b]), block_th.tier(s)) for b, s in block_scores.items()]
    return Decision(blocks, {"tensor": tensor_th, "block": block_th})


def decide(tensors: list[TensorEntry], params: PlanParams, scores: dict[str, float] | None = None) -> Decision:
    """Fill precision, llama_type and reason of every ranked tensor from its score (default: its
    entropy) against the thresholds of its level; return the blocks and both levels' thresholds."""
    scores = scores if scores is not None else {t.hf_name: t.entropy_bits for t in tensors}
    decision = record(tensors, params, scores)
    block_precision = {b.index: b.precision for b in decision.blocks}
    for t in tensors:
        if t.is_kept:
            continue
        if params.granularity is Granularity.BLOCK and t.block is not None:
            t.precision, t.reason = block_precision[t.block], Reason.BLOCK_ENTROPY
        else:
            t.precision, t.reason = decision.thresholds["tensor"].tier(scores[t.hf_name]), Reason.TENSOR_ENTROPY
        t.llama_type = threshold_type(t.precision, t.ncols)
    return decision
