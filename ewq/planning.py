"""Building a plan from a model directory: read tensors one by one, score, decide, write."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from . import budget, ggml_quant, llamacpp, plan as plan_mod, weights
from .cli import log, progress
from .entropy import tensor_stats
from .errors import UserError
from .results import ensure_writable_dir, write_json_atomic, write_text_atomic


def analyse_model(files: weights.ModelFiles, bins: int,
                  on_tensor: Callable[[plan_mod.TensorEntry, torch.Tensor], None] | None = None
                  ) -> list[plan_mod.TensorEntry]:
    """One TensorEntry per floating-point tensor, with entropy and statistics; `on_tensor` sees
    each entry with its values while they are in memory (the only read of the weights)."""
    namer = llamacpp.GGUFNamer(files.config)
    infos = [t for t in weights.list_tensors(files) if t.dtype in ("F16", "BF16", "F32", "F64")]
    entries = []
    for info, tensor in progress(weights.iter_tensors(infos), total=len(infos), desc="entropy", unit="tensor"):
        try:
            stats = tensor_stats(tensor, bins)
        except ValueError as error:
            raise UserError(f"tensor {info.name} of {files.root}: {error}") from None
        entries.append(plan_mod.TensorEntry(
            hf_name=info.name,
            gguf_name=namer(info.name),
            block=plan_mod.block_index(info.name),
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


def create_plan(model: str, params: plan_mod.PlanParams, imatrix: Path | None = None) -> plan_mod.Plan:
    files = weights.open_model(model)
    log(f"model {files.root} ({files.model_type}, {files.num_layers} blocks, {len(files.weight_files)} file(s))")
    model_hash = weights.model_hash(files)
    errors: dict[str, float] = {}
    wants_error = params.is_budget and budget.Score(params.score) is budget.Score.ERROR
    importance = ggml_quant.load_imatrix(imatrix) if wants_error and imatrix else None

    def measure_error(entry: plan_mod.TensorEntry, tensor: torch.Tensor) -> None:
        if entry.is_matrix and plan_mod.keep_reason(entry, params) is None:
            errors[entry.hf_name] = budget.floor_error(entry, tensor, importance)

    tensors = analyse_model(files, params.bins, measure_error if wants_error else None)
    blocks, thresholds = plan_mod.decide(tensors, params)
    reached = apply_budget(tensors, blocks, params, errors) if params.is_budget else None
    return plan_mod.Plan(model_id=model, model_hash=model_hash, model_type=files.model_type, params=params,
                         tensors=tensors, blocks=blocks, thresholds=thresholds, budget=reached)


def apply_budget(tensors: list[plan_mod.TensorEntry], blocks: list[plan_mod.BlockEntry],
                 params: plan_mod.PlanParams, errors: dict[str, float]) -> dict:
    """Replace the threshold decision by a size-budget allocation (ewq.budget); blocks get the
    bitsandbytes precision that holds most of their parameters. `errors`: the measured error of
    every ranked matrix, for --score error."""
    total = sum(t.numel for t in tensors)
    budget_bits = params.target_bpw * total if params.target_bpw is not None else params.target_bytes * 8
    kept = {t.hf_name: plan_mod.keep_reason(t, params) for t in tensors}
    ranked = [t for t in tensors if t.is_matrix and kept[t.hf_name] is None]
    score = budget.Score(params.score)
    if score is budget.Score.ENTROPY:
        scores = {t.hf_name: t.entropy_bits for t in ranked}
    elif score is budget.Score.RANDOM:
        scores = budget.random_scores(ranked, params.seed)
    else:
        scores = {t.hf_name: errors[t.hf_name] for t in ranked}
    for t in ranked:
        t.rank_score = scores[t.hf_name]
    reached = budget.assign(tensors, kept, scores, score, budget_bits)
    for block in blocks:
        held: dict[plan_mod.Precision, int] = {}
        for t in tensors:
            if t.block == block.index and t.is_matrix:
                held[t.precision] = held.get(t.precision, 0) + t.numel
        block.precision = max(held, key=held.get) if held else block.precision
    return reached


def write_plan(plan: plan_mod.Plan, out_dir: Path) -> tuple[Path, Path]:
    out_dir = ensure_writable_dir(out_dir)
    json_path = plan_mod.plan_path(out_dir, plan.plan_hash)
    script = plan_mod.script_path(out_dir, plan.plan_hash)
    write_json_atomic(json_path, plan.to_json())
    write_text_atomic(script, llamacpp.quantize_script(plan), mode=0o755)
    return json_path, script
