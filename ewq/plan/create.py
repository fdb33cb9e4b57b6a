"""Creating a plan from a model directory, in four steps: name, read, score, decide; (the caller) writes.

    name    every tensor's GGUF name, from llama.cpp's converter (llamacpp.names); a plan whose
            matrices cannot all be named is refused: its quantize script would not reach them.
            MoE experts stacked into one GGUF tensor are one entry (ewq.experts); a matrix the
            converter rearranges is one entry per tensor it writes (ewq.rearranged: its parts,
            passed on to whatever measures the model)
    read    every floating-point tensor once, memory-mapped, one at a time (weights.iter_tensors):
            its statistics and entropy (entropy.py), its keep-rule (entries.apply_keep_rule); a
            scorer measures what it needs meanwhile
    score   every matrix that no keep-rule holds (scores.py)
    decide  the threshold rule or the size-budget allocation (threshold.py / budget.py); a kld plan
            then measures itself whole on the calibration windows, with the model the scores were
            measured with and in the arithmetic they model (additivity: predicted against measured)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import experts, rearranged, weights
from ..console import log, progress
from ..errors import UserError
from ..fileio import file_digest
from ..llamacpp.names import Naming, gguf_names
from ..llamacpp.quantizers import ImportanceMatrix
from ..quant_types import Arithmetic
from ..sensitivity.cached import CachedSensitivity, CalibrationSpec
from ..sensitivity.service import groups_for
from ..weights import block_index
from . import budget, threshold
from .distortion import DistortionCache
from .entries import Decision, Plan, PlanParams, Score, TensorEntry, apply_keep_rule
from .entropy import tensor_stats
from .scores import KldScorer, PredictingScorer, Scores, scorer_for

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def name_tensors(files: weights.ModelFiles, infos: list[weights.TensorInfo], stacks: dict[str, list[str]],
                 unread: list[weights.TensorInfo]) -> tuple[dict[str, str | None], dict[str, list[rearranged.Part]]]:
    """(hf name -> GGUF name of every tensor of `infos` (an expert's matrix: its stack's, ewq.experts),
    checkpoint matrix -> its parts for every matrix the converter rearranges (ewq.rearranged)); a
    UserError if a matrix has no name, if the converter writes it neither under that name and shape
    nor rearranged, or if a matrix is stored quantized (`unread`: the tensors that are not floats)."""
    asked = {info.name: experts.stack_name(info.name) or info.name for info in infos}
    naming = gguf_names(files.root, files.config, sorted(set(asked.values())))
    classes = files.config.get("architectures")
    if naming.arch is None:
        raise UserError(f"llama.cpp's converter does not know {classes} (model {files.root}): no GGUF file, "
                        "so no plan for one")
    check_not_quantized(files, unread, naming)
    named = {name: naming.names.get(asked[name]) for name in asked}
    parts = rearranged.parts_of(naming, {info.name: info.shape for info in infos})
    # biases the converter writes under names of its own (GPT-OSS's per-expert [experts, out] ones)
    biases = {name for name, outputs in (naming.written or {}).items()
              if outputs and all(output.name.endswith(".bias") for output in outputs)}
    for name in biases - set(parts):
        if len(naming.written[name]) == 1:
            named[name] = naming.written[name][0].name
    planned = set(parts) | biases  # not checked against the map below
    fused = [info for info in infos if len(info.shape) >= 3 and ".experts." in info.name and info.name not in planned]
    if fused:
        raise UserError(f"{files.root} stores its MoE experts already fused ({fused[0].name}, {list(fused[0].shape)}) "
                        "and llama.cpp's converter does not only rearrange them: a plan cannot follow this layout yet")
    unnamed = [info.name for info in infos if len(info.shape) == 2 and named[info.name] is None
               and info.name not in planned]
    if unnamed:
        raise UserError(f"{len(unnamed)} matrices of {files.root} ({naming.arch}) have no GGUF name of their own, "
                        f"e.g. {unnamed[0]}: llama.cpp's converter merges or renames them, which a plan cannot "
                        "follow yet")
    check_written(files, [info for info in infos if info.name not in planned], stacks, named, naming)
    return named, parts


def check_not_quantized(files: weights.ModelFiles, unread: list[weights.TensorInfo], naming: Naming) -> None:
    """A plan reads floating-point tensors only: a UserError if matrices are stored quantized (GPT-OSS's
    MXFP4 experts, DeepSeek-V3's FP8, GPTQ's packed ints), rather than a plan that leaves them out.
    Quantized means: not a float, not a mask (bool), at least 2-D, and the checkpoint declares a
    quantization_config or the converter writes the tensor."""
    method = next((config["quantization_config"].get("quant_method", "unnamed") for config in
                   (files.config, files.config.get("text_config") or {})
                   if isinstance(config.get("quantization_config"), dict)), None)
    stored = [info for info in unread if len(info.shape) >= 2 and info.dtype != "BOOL"
              and (method or (naming.written or {}).get(info.name))]
    if stored:
        first, declared = stored[0], f"quant_method {method}; " if method else ""
        raise UserError(f"{len(stored)} tensors of {files.root} are stored quantized ({declared}e.g. {first.name} "
                        f"{first.dtype} {list(first.shape)}): a plan measures and quantizes weights in floating "
                        "point; give it the bf16/fp16 checkpoint")


def check_written(files: weights.ModelFiles, infos: list[weights.TensorInfo], stacks: dict[str, list[str]],
                  named: dict[str, str | None], naming: Naming) -> None:
    """Every matrix is what the converter writes (its dry run): under its GGUF name, in its shape (a
    stack of experts: [experts, out, in]); else a UserError."""
    if naming.written is None:
        log(f"note: llama.cpp's converter could not be run dry on {files.root} ({naming.failure}); the GGUF names "
            "come from its tensor map alone")
        return
    shapes = {output.name: output.shape for outputs in naming.written.values() for output in outputs}
    for info in infos:
        if len(info.shape) != 2:
            continue
        stack = experts.stack_name(info.name)
        expected = (len(stacks[stack]), *info.shape) if stack else tuple(info.shape)
        gguf_name, own = named[info.name], naming.written.get(info.name, [])
        if shapes.get(gguf_name) != expected or any(output.name != gguf_name for output in own if not stack):
            writes = ", ".join(f"{output.name} {list(output.shape)}" for output in own) or "nothing of its own"
            raise UserError(f"{info.name} {list(info.shape)} of {files.root}: llama.cpp's converter writes {writes}, "
                            f"not {gguf_name} {list(expected)}; a plan cannot follow a matrix that the converter "
                            "computes anew, renames or drops")


def new_entry(name: str, gguf_name: str | None, shape: list[int], dtype: str, values: torch.Tensor, bins: int,
              files: weights.ModelFiles, **extra) -> TensorEntry:
    """An entry with the entropy and statistics of its values (`extra`: experts or source)."""
    try:
        stats = tensor_stats(values, bins)
    except ValueError as error:
        raise UserError(f"tensor {name} of {files.root}: {error}") from None
    return TensorEntry(hf_name=name, gguf_name=gguf_name, block=block_index(name), shape=shape, dtype=dtype,
                       numel=stats.numel, entropy_bits=stats.entropy_bits, std=stats.std,
                       max_abs_over_std=stats.max_abs_over_std, excess_kurtosis=stats.excess_kurtosis, **extra)


@dataclass(frozen=True)
class ModelNames:
    """What the naming step found: the floating-point tensors, MoE stacks (stack -> members in expert
    order), GGUF names (hf name -> name) and the parts of rearranged matrices (source -> parts)."""
    infos: list[weights.TensorInfo]
    stacks: dict[str, list[str]]
    names: dict[str, str | None]
    parts: dict[str, list[rearranged.Part]]


def name_model(files: weights.ModelFiles) -> ModelNames:
    """The naming step (module doc), once per plan."""
    every = weights.list_tensors(files)
    infos = [t for t in every if t.dtype in FLOAT_DTYPES]
    stacks = experts.stacks([info.name for info in infos])
    names, parts = name_tensors(files, infos, stacks, [t for t in every if t.dtype not in FLOAT_DTYPES])
    return ModelNames(infos, stacks, names, parts)


def read_entries(files: weights.ModelFiles, params: PlanParams, named: ModelNames,
                 on_tensor: Callable[[TensorEntry, torch.Tensor], None] | None = None) -> list[TensorEntry]:
    """One TensorEntry per floating-point tensor, per stack of MoE experts (their matrices stacked as
    llama.cpp does) or per part of a matrix the converter rearranges (the part as written), with
    entropy, statistics and keep-rule; `on_tensor` sees each entry with its values while they are in
    memory (the only read of the weights)."""
    infos, stacks, names, parts = list(named.infos), named.stacks, named.names, named.parts
    stack_of = {member: stack for stack, members in stacks.items() for member in members}
    # members of a stack next to each other, in expert order, so that one stack at a time is held
    position = {info.name: i for i, info in enumerate(infos)}
    infos.sort(key=lambda info: (position[stacks[stack_of[info.name]][0]], experts.expert_index(info.name))
               if info.name in stack_of else (position[info.name], 0))
    held: dict[str, list[torch.Tensor]] = {}
    entries = []

    def add(entry: TensorEntry, values: torch.Tensor) -> None:
        apply_keep_rule(entry, params)
        entries.append(entry)
        if on_tensor is not None:
            on_tensor(entry, values)

    for info, tensor in progress(weights.iter_tensors(infos), total=len(infos), desc="entropy", unit="tensor"):
        name, shape = info.name, list(info.shape)
        if name in parts:
            for part in parts[name]:
                values = part.of(tensor)
                add(new_entry(part.name, part.gguf_name, list(part.shape), info.dtype, values, params.bins, files,
                              source=name), values)
            continue
        stack = stack_of.get(name)
        if stack is not None:
            held.setdefault(stack, []).append(tensor)
            if len(held[stack]) < len(stacks[stack]):
                continue
            tensor = torch.stack(held.pop(stack))
            name, shape = stack, [len(stacks[stack]), *shape]
        add(new_entry(name, names.get(info.name), shape, info.dtype, tensor, params.bins, files,
                      experts=stacks.get(stack) if stack else None), tensor)
        del tensor
    entries.sort(key=lambda e: (e.block is not None, e.block or 0, e.hf_name))
    return entries


# A correction round's factor on a group's sensitivities is held within these (a group whose marginal comes
# out near zero or below, in the noise of the calibration windows, would otherwise lose all its bits)
CORRECTION_LIMITS = (0.25, 4.0)


def correct(tensors: list[TensorEntry], params: PlanParams, scorer: KldScorer, scores: Scores,
            sensitivity: CachedSensitivity, arithmetic: Arithmetic, first_decision: Decision) -> Decision:
    """The correction round (PlanParams.correction_band), after a first allocation of a kld plan: with that
    whole plan applied, each group's marginal ΔKLD (the plan's KLD minus that of the plan with the group back
    at its original values) over the sum of its members' predicted ΔKLD at their chosen types is a factor on
    their sensitivities α_t (within CORRECTION_LIMITS); then the types are allocated again (`first_decision`:
    the first allocation, its types on the tensors). What it corrects:
    the additive model measures each tensor with every other one exact, at its reference type, and predicts
    other types linearly in their error; in the plan every other tensor is perturbed too, at its own type."""
    ranked = [t for t in tensors if not t.is_kept]
    groups = groups_for(ranked, params.correction_band if params.correction_band > 1 else None)
    first = {t.hf_name: t.llama_type for t in ranked}
    whole, marginal = sensitivity.in_context([(t, first[t.hf_name]) for t in ranked], groups, arithmetic)
    low, high = CORRECTION_LIMITS
    factors, held = {}, 0
    for group in groups:
        predicted = sum(scores.gguf[t.hf_name][first[t.hf_name]] for t in group.entries)
        factor = marginal[group.name] / predicted if predicted > 0 else 1.0
        held += not low <= factor <= high
        factors.update({t.hf_name: min(max(factor, low), high) for t in group.entries})
    scorer.corrections = factors
    decision = budget.decide(tensors, params, scorer.scores(ranked))
    decision.budget.gguf.first_predicted_kld = first_decision.budget.gguf.predicted_kld
    decision.budget.gguf.first_measured_kld_calibration = whole
    ordered = sorted(factors[g.entries[0].hf_name] for g in groups)
    log(f"correction round: the first allocation's KLD on the calibration windows {whole:.4g} measured, "
        f"{decision.budget.gguf.first_predicted_kld:.4g} predicted, its {len(groups)} groups' marginals "
        f"{sum(marginal.values()):.4g} in sum; factors {ordered[0]:.2f} … median {ordered[len(ordered) // 2]:.2f} … "
        f"{ordered[-1]:.2f} ({held} held within {low}–{high}); allocated again: "
        f"{sum(first[t.hf_name] != t.llama_type for t in ranked)} of {len(ranked)} tensors changed type")
    return decision


def create_plan(model: str | weights.ModelFiles, params: PlanParams, imatrix: ImportanceMatrix | None = None,
                cache_dir: Path | None = None, device: str = "cpu", model_id: str | None = None,
                device_map: str | None = None) -> Plan:
    """The plan of `model` (a directory or hub id, or its files already opened; `model_id` is what the
    plan records, default the name given); the kld score measures on `device`, or spread by accelerate's
    `device_map` strategy (hf.load_model); measurements (sensitivity, the
    distortion table) are cached in `cache_dir` (none without it), written once the plan is decided."""
    files = model if isinstance(model, weights.ModelFiles) else weights.open_model(model)
    model_id = model_id or (model if isinstance(model, str) else str(files.root))
    log(f"model {files.root} ({files.model_type}, {files.num_layers} blocks, {len(files.weight_files)} file(s))")
    model_hash = weights.model_hash(files)
    named = name_model(files)
    # what both caches are keyed by: the plan's record of the importance matrix, else the file's own digest
    imatrix_digest = params.imatrix_digest or (file_digest(imatrix.path) if imatrix is not None else None)
    sensitivity = None
    if params.score is Score.KLD:
        sensitivity = CachedSensitivity(files.root, model_hash,
                                        CalibrationSpec(params.calibration_windows, params.calibration_context),
                                        device, Path(cache_dir or "."), imatrix, imatrix_digest,
                                        rearranged.by_name(named.parts), getattr(torch, params.measure_dtype or "float32"),
                                        device_map)
    scorer = scorer_for(params, imatrix, sensitivity)
    if isinstance(scorer, PredictingScorer) and cache_dir is not None:
        scorer.distortions = DistortionCache.open(Path(cache_dir), model_hash, imatrix_digest)
    started = time.perf_counter()
    tensors = read_entries(files, params, named, scorer.observe)
    log(f"read: {len(tensors)} tensors in {time.perf_counter() - started:.0f} s (statistics and entropy"
        + (", every type's error)" if isinstance(scorer, PredictingScorer) else ")"))
    scores = scorer.scores([t for t in tensors if not t.is_kept])
    decision = budget.decide(tensors, params, scores) if params.is_budget else \
        threshold.decide(tensors, params, scores.rank)
    arithmetic = params.kld_arithmetic or Arithmetic.WEIGHTS
    if params.correction_band is not None:
        decision = correct(tensors, params, scorer, scores, sensitivity, arithmetic, decision)
    if sensitivity is not None:
        gguf = decision.budget.gguf
        gguf.measured_kld_calibration = sensitivity.kld_of([(t, t.llama_type) for t in tensors if t.rank_score is not None],
                                                           arithmetic, last=True)
        inputs = "" if arithmetic is Arithmetic.WEIGHTS else f", inputs rounded as llama.cpp's {arithmetic.value} matmuls do"
        log(f"additivity on the calibration windows: predicted KLD {gguf.predicted_kld:.3g} (sum over tensors), "
            f"measured {gguf.measured_kld_calibration:.3g} (all tensors at once{inputs})")
    if isinstance(scorer, PredictingScorer) and scorer.distortions is not None:
        scorer.distortions.save()
    return Plan(model_id=model_id, model_hash=model_hash, model_type=files.model_type, params=params,
                tensors=tensors, blocks=decision.blocks, thresholds=decision.thresholds, budget=decision.budget)
