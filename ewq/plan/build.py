"""Building a plan from a model directory, in four steps: read, score, decide, (the caller) write.

    read    every floating-point tensor once, memory-mapped, one at a time (weights.iter_tensors):
            its statistics and entropy (entropy.py); a scorer measures what it needs meanwhile
    score   one score per matrix that no keep-rule holds (scores.py)
    decide  the threshold rule or the size-budget allocation (threshold.py / budget.py)
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import weights
from ..console import log, progress
from ..errors import UserError
from ..llamacpp.names import GGUFNamer
from ..llamacpp.quantizers import ImportanceMatrix
from . import budget, threshold
from .entropy import tensor_stats
from .model import Decision, Plan, PlanParams, Rule, TensorEntry, block_index, keep_reason
from .scores import scorer_for

DECISIONS: dict[Rule, Callable[[list[TensorEntry], PlanParams, dict[str, float]], Decision]] = {
    Rule.THRESHOLD: threshold.decide,
    Rule.BUDGET: budget.decide,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_entries(files: weights.ModelFiles, bins: int,
                 on_tensor: Callable[[TensorEntry, torch.Tensor], None] | None = None) -> list[TensorEntry]:
    """One TensorEntry per floating-point tensor, with entropy and statistics; `on_tensor` sees
    each entry with its values while they are in memory (the only read of the weights)."""
    namer = GGUFNamer(files.config)
    infos = [t for t in weights.list_tensors(files) if t.dtype in FLOAT_DTYPES]
    entries = []
    for info, tensor in progress(weights.iter_tensors(infos), total=len(infos), desc="entropy", unit="tensor"):
        try:
            stats = tensor_stats(tensor, bins)
        except ValueError as error:
            raise UserError(f"tensor {info.name} of {files.root}: {error}") from None
        entries.append(TensorEntry(
            hf_name=info.name,
            gguf_name=namer(info.name),
            block=block_index(info.name),
            shape=list(info.shape),
            dtype=info.dtype,
            numel=stats.numel,
            entropy_bits=stats.entropy_bits,
            std=stats.std,
            max_abs_over_std=stats.max_abs_over_std,
            excess_kurtosis=stats.excess_kurtosis,
        ))
        if on_tensor is not None:
            on_tensor(entries[-1], tensor)
        del tensor
    entries.sort(key=lambda e: (e.block is not None, e.block or 0, e.hf_name))
    return entries


def create_plan(model: str, params: PlanParams, imatrix: ImportanceMatrix | None = None) -> Plan:
    files = weights.open_model(model)
    log(f"model {files.root} ({files.model_type}, {files.num_layers} blocks, {len(files.weight_files)} file(s))")
    model_hash = weights.model_hash(files)
    scorer = scorer_for(params, imatrix)
    tensors = read_entries(files, params.bins, scorer.observe)
    scores = scorer.scores([t for t in tensors if keep_reason(t, params) is None])
    decision = DECISIONS[params.rule](tensors, params, scores)
    return Plan(model_id=model, model_hash=model_hash, model_type=files.model_type, params=params,
                tensors=tensors, blocks=decision.blocks, thresholds=decision.thresholds, budget=decision.budget)
