"""Building a plan from a model directory: read tensors one by one, score, decide, write."""
from __future__ import annotations

from pathlib import Path

from . import llamacpp, plan as plan_mod, weights
from .cli import log, progress
from .entropy import tensor_stats
from .errors import UserError
from .results import ensure_writable_dir, write_json_atomic, write_text_atomic


def analyse_model(files: weights.ModelFiles, bins: int) -> list[plan_mod.TensorEntry]:
    """One TensorEntry per floating-point tensor, with entropy and statistics."""
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
        del tensor
    entries.sort(key=lambda e: (e.block is not None, e.block or 0, e.hf_name))
    return entries


def create_plan(model: str, params: plan_mod.PlanParams) -> plan_mod.Plan:
    files = weights.open_model(model)
    log(f"model {files.root} ({files.model_type}, {files.num_layers} blocks, {len(files.weight_files)} file(s))")
    model_hash = weights.model_hash(files)
    tensors = analyse_model(files, params.bins)
    blocks, thresholds = plan_mod.decide(tensors, params)
    return plan_mod.Plan(model_id=model, model_hash=model_hash, model_type=files.model_type, params=params,
                         tensors=tensors, blocks=blocks, thresholds=thresholds)


def write_plan(plan: plan_mod.Plan, out_dir: Path) -> tuple[Path, Path]:
    out_dir = ensure_writable_dir(out_dir)
    json_path = plan_mod.plan_path(out_dir, plan.plan_hash)
    script = plan_mod.script_path(out_dir, plan.plan_hash)
    write_json_atomic(json_path, plan.to_json())
    write_text_atomic(script, llamacpp.quantize_script(plan), mode=0o755)
    return json_path, script
