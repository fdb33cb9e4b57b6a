"""Building a plan from a model directory, in four steps: read, score, decide, (the caller) write.

    name    every tensor's GGUF name, from llama.cpp's converter (llamacpp.names); a plan whose
            matrices cannot all be named is refused: its quantize script would not reach them.
            MoE experts stacked into one GGUF tensor are one entry (ewq.experts)
    read    every floating-point tensor once, memory-mapped, one at a time (weights.iter_tensors):
            its statistics and entropy (entropy.py); a scorer measures what it needs meanwhile
    score   every matrix that no keep-rule holds (scores.py)
    decide  the threshold rule or the size-budget allocation (threshold.py / budget.py)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .. import experts, weights
from ..console import log, progress
from ..errors import UserError
from ..llamacpp.names import Naming, gguf_names
from ..llamacpp.quantizers import ImportanceMatrix
from . import budget, threshold
from .entropy import tensor_stats
from . import measure
from .measure import CalibrationSpec
from .model import Decision, Plan, PlanParams, Rule, Score, TensorEntry, block_index, keep_reason
from .scores import Calibration, Scores, scorer_for

DECISIONS: dict[Rule, Callable[[list[TensorEntry], PlanParams, Scores], Decision]] = {
    Rule.THRESHOLD: threshold.decide,
    Rule.BUDGET: budget.decide,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def name_tensors(files: weights.ModelFiles, infos: list[weights.TensorInfo],
                 stacks: dict[str, list[str]]) -> dict[str, str | None]:
    """hf name -> GGUF name of every tensor (an expert's matrix: its stack's, ewq.experts); a UserError
    if a matrix has none, or if the converter does not write it under that name and shape."""
    asked = {info.name: experts.stack_name(info.name) or info.name for info in infos}
    naming = gguf_names(files.root, files.config, sorted(set(asked.values())))
    classes = files.config.get("architectures")
    if naming.arch is None:
        raise UserError(f"llama.cpp's converter does not know {classes} (model {files.root}): no GGUF file, "
                        "so no plan for one")
    named = {name: naming.names.get(asked[name]) for name in asked}
    fused = [info for info in infos if len(info.shape) >= 3 and ".experts." in info.name]
    if fused:
        raise UserError(f"{files.root} stores its MoE experts already fused ({fused[0].name}, {list(fused[0].shape)}): "
                        "a plan follows one matrix per expert (ewq.experts), not this layout yet")
    unnamed = [info.name for info in infos if len(info.shape) == 2 and named[info.name] is None]
    if unnamed:
        raise UserError(f"{len(unnamed)} matrices of {files.root} ({naming.arch}) have no GGUF name of their own, "
                        f"e.g. {unnamed[0]}: llama.cpp's converter merges or renames them, which a plan cannot "
                        "follow yet")
    check_written(files, infos, stacks, named, naming)
    return named


def check_written(files: weights.ModelFiles, infos: list[weights.TensorInfo], stacks: dict[str, list[str]],
                  named: dict[str, str | None], naming: Naming) -> None:
    """Every matrix is what the converter writes (its dry run): under its GGUF name, in its shape (a
    stack of experts: [experts, out, in]), and not split into other tensors; else a UserError."""
    if naming.written is None:
        log(f"note: llama.cpp's converter could not be run dry on {files.root} ({naming.failure}); the GGUF names "
            "come from its tensor map alone")
        return
    shapes = {name: shape for outputs in naming.written.values() for name, shape in outputs}
    for info in infos:
        if len(info.shape) != 2:
            continue
        stack = experts.stack_name(info.name)
        expected = (len(stacks[stack]), *info.shape) if stack else tuple(info.shape)
        gguf_name, own = named[info.name], naming.written.get(info.name, [])
        if shapes.get(gguf_name) != expected or any(name != gguf_name for name, _ in own if not stack):
            writes = ", ".join(f"{name} {list(shape)}" for name, shape in own) or "nothing of its own"
            raise UserError(f"{info.name} {list(info.shape)} of {files.root}: llama.cpp's converter writes {writes}, "
                            f"not {gguf_name} {list(expected)}; a plan cannot follow a matrix that the converter "
                            "splits, reshapes or drops yet")


def read_entries(files: weights.ModelFiles, bins: int,
                 on_tensor: Callable[[TensorEntry, torch.Tensor], None] | None = None) -> list[TensorEntry]:
    """One TensorEntry per floating-point tensor, or per stack of MoE experts (their matrices stacked
    as llama.cpp does), with entropy and statistics; `on_tensor` sees each entry with its values
    while they are in memory (the only read of the weights)."""
    infos = [t for t in weights.list_tensors(files) if t.dtype in FLOAT_DTYPES]
    stacks = experts.stacks([info.name for info in infos])
    names = name_tensors(files, infos, stacks)
    stack_of = {member: stack for stack, members in stacks.items() for member in members}
    # members of a stack next to each other, in expert order, so that one stack at a time is held
    position = {info.name: i for i, info in enumerate(infos)}
    infos.sort(key=lambda info: (position[stacks[stack_of[info.name]][0]], experts.expert_index(info.name))
               if info.name in stack_of else (position[info.name], 0))
    held: dict[str, list[torch.Tensor]] = {}
    entries = []
    for info, tensor in progress(weights.iter_tensors(infos), total=len(infos), desc="entropy", unit="tensor"):
        name, shape = info.name, list(info.shape)
        stack = stack_of.get(name)
        if stack is not None:
            held.setdefault(stack, []).append(tensor)
            if len(held[stack]) < len(stacks[stack]):
                continue
            tensor = torch.stack(held.pop(stack))
            name, shape = stack, [len(stacks[stack]), *shape]
        try:
            stats = tensor_stats(tensor, bins)
        except ValueError as error:
            raise UserError(f"tensor {name} of {files.root}: {error}") from None
        entries.append(TensorEntry(
            hf_name=name,
            gguf_name=names.get(info.name),
            block=block_index(name),
            shape=shape,
            dtype=info.dtype,
            numel=stats.numel,
            entropy_bits=stats.entropy_bits,
            std=stats.std,
            max_abs_over_std=stats.max_abs_over_std,
            excess_kurtosis=stats.excess_kurtosis,
            experts=stacks.get(stack) if stack else None,
        ))
        if on_tensor is not None:
            on_tensor(entries[-1], tensor)
        del tensor
    entries.sort(key=lambda e: (e.block is not None, e.block or 0, e.hf_name))
    return entries


def create_plan(model: str, params: PlanParams, imatrix: ImportanceMatrix | None = None,
                cache_dir: Path | None = None, device: str = "cpu") -> Plan:
    """The plan of `model`; the kld score measures on `device` and caches in `cache_dir`."""
    files = weights.open_model(model)
    log(f"model {files.root} ({files.model_type}, {files.num_layers} blocks, {len(files.weight_files)} file(s))")
    model_hash = weights.model_hash(files)
    calibration = None
    if params.score is Score.KLD:
        calibration = Calibration(files.root, model_hash, Path(cache_dir or "."), device,
                                  CalibrationSpec(params.calibration_windows, params.calibration_context))
    scorer = scorer_for(params, imatrix, calibration)
    tensors = read_entries(files, params.bins, scorer.observe)
    scores = scorer.scores([t for t in tensors if keep_reason(t, params) is None])
    decision = DECISIONS[params.rule](tensors, params, scores)
    if params.score is Score.KLD:
        gguf = decision.budget["gguf"]
        ranked = [t for t in tensors if t.rank_score is not None]
        gguf["measured_kld_calibration"] = measure.whole_plan_kld(files.root, ranked, imatrix, calibration.spec,
                                                                  calibration.device)
        log(f"additivity on the calibration windows: predicted KLD {gguf['predicted_kld']:.3g} (sum over tensors), "
            f"measured {gguf['measured_kld_calibration']:.3g} (all tensors at once)")
    return Plan(model_id=model, model_hash=model_hash, model_type=files.model_type, params=params,
                tensors=tensors, blocks=decision.blocks, thresholds=decision.thresholds, budget=decision.budget)
