"""The threshold rule: EWQ's original decision, by how far a score lies from the mean.

Over the scored units of one level (tensors, or blocks), with mean μ and std σ of their scores
(entropies in bits; a block's score is the parameter-weighted mean of its matrices'):
    score >= μ + fp16_factor·σ              -> fp16  (kept)
    μ - entropy_factor·σ <= score < ...     -> 8-bit
    score <  μ - entropy_factor·σ           -> 4-bit
Low entropy (values crowded into few histogram bins) is taken as "compresses well" and is
quantized harder; that is the EWQ hypothesis, which this tool applies, not proves.
Keep-rules (model.keep_reason) come first. Every plan records both levels' thresholds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .model import (BlockEntry, Decision, Granularity, PlanParams, Reason, TensorEntry, Thresholds, keep, keep_reason,
                    llama_type_for, param_weighted_mean)

if TYPE_CHECKING:
    from .scores import Scores

RULE_TEXT = {
    "fp16": "score >= mean + fp16_factor*std",
    "8bit": "mean - entropy_factor*std <= score < mean + fp16_factor*std",
    "4bit": "score < mean - entropy_factor*std",
}


def decide(tensors: list[TensorEntry], params: PlanParams, scores: Scores | None = None) -> Decision:
    """Fill precision, llama_type and reason of every tensor from the rank scores (of every tensor
    no keep-rule holds; default: its entropy); return the blocks and both levels' thresholds."""
    scores = scores.rank if scores is not None else {t.hf_name: t.entropy_bits for t in tensors}
    kept = {t.hf_name: keep_reason(t, params) for t in tensors}
    scored = [t for t in tensors if kept[t.hf_name] is None]
    by_block: dict[int, list[TensorEntry]] = {}
    for t in scored:
        if t.block is not None:
            by_block.setdefault(t.block, []).append(t)
    block_scores = {b: param_weighted_mean(by_block[b], lambda t: scores[t.hf_name]) for b in sorted(by_block)}

    tensor_th = Thresholds.from_scores([scores[t.hf_name] for t in scored], params)
    block_th = Thresholds.from_scores(list(block_scores.values()), params)
    blocks = [BlockEntry(b, s, sum(t.numel for t in by_block[b]), block_th.tier(s)) for b, s in block_scores.items()]
    block_precision = {b.index: b.precision for b in blocks}

    for t in tensors:
        if kept[t.hf_name] is not None:
            keep(t, kept[t.hf_name])
            continue
        if params.granularity is Granularity.BLOCK and t.block is not None:
            t.precision, t.reason = block_precision[t.block], Reason.BLOCK_ENTROPY
        else:
            t.precision, t.reason = tensor_th.tier(scores[t.hf_name]), Reason.TENSOR_ENTROPY
        t.llama_type = llama_type_for(t.precision, t)
    return Decision(blocks, {"tensor": tensor_th, "block": block_th})
