"""One benchmark run: every stage on one backend, checkpointed, then one result file.

Every variant is measured with the same EvalSettings and EvalData: the same token windows, MMLU
questions, prompts, greedy decoding and memory measurement. The result lands in
    <out-dir>/<variant>[-<tag>]_<model_hash>_<settings digest>.json     (results/record.py)
so that a re-run replaces its own file and variants with equal settings find each other.
The original run also writes <...>.logprobs.npy, the reference for every variant's KLD.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..backends.base import Backend
from ..console import log
from ..errors import UserError
from ..metrics import generation, memory, mmlu, perplexity
from ..metrics.stats import paired_difference
from .. import fileio
from ..results import environment
from ..results.checkpoint import CHECKPOINT_DIR, Checkpoint
from ..results.record import COMPARISON, Result, Stage, Variant, WeightsReport, document, read_result, result_stem
from .inputs import EvalData


def load_reference(out_dir: Path, model_hash: str, data: EvalData) -> Result | None:
    """The original's result with these settings, or None (then KLD and deltas are left out)."""
    path = out_dir / f"{result_stem(Variant.ORIGINAL, model_hash, data.settings.digest)}.json"
    if not path.is_file():
        log(f"warning: no original result with these settings ({path.name}); KLD and deltas are left out")
        return None
    reference = read_result(path)
    if reference is None:
        raise UserError(f"original result {path} is not a readable result file")
    return reference


def compare(current: Result, reference: Result) -> dict:
    """Paired deltas vs the original on the same windows and questions."""
    nll = paired_difference(current.per_window_nll, reference.per_window_nll)
    out = {"reference_file": reference.file, "mean_nll_delta": nll.to_json(paired=True), "ppl_ratio": math.exp(nll.mean)}
    if current.per_question_correct is not None:
        out["mmlu_accuracy_delta"] = paired_difference(current.per_question_correct,
                                                       reference.per_question_correct).to_json(paired=True)
    return out


@dataclass
class Context:
    """What every stage of one run sees."""
    backend: Backend
    tokenizer: object
    data: EvalData
    reference: Result | None
    out_dir: Path
    stem: str
    ckpt: Checkpoint
    variant: Variant


def _perplexity(ctx: Context, done: list, save: Callable[[list], None]) -> dict:
    """Perplexity on every window; the original also records its log-probs (the KLD reference)
    into a checkpoint file that is committed beside the result; variants read that reference."""
    spec, tokens, backend = ctx.data.settings.window_spec, ctx.data.tokens, ctx.backend
    starts = perplexity.window_starts(len(tokens), spec)
    n_kld_tokens = min(spec.kld_windows, len(starts)) * spec.stride
    if ctx.variant is Variant.ORIGINAL:
        if n_kld_tokens == 0:
            return perplexity.evaluate(backend, tokens, spec)
        with fileio.atomic_path(ctx.ckpt.file(".logprobs.npy")) as temp:
            vocab = backend.vocab_size
            record = perplexity.open_record(temp, n_kld_tokens, vocab)
            out = perplexity.evaluate(backend, tokens, spec, record=record)
            record.flush()
            del record
        out["kld_reference"] = {"file": f"{ctx.stem}.logprobs.npy", "n_tokens": n_kld_tokens, "vocab": vocab}
        return out
    ref_array = None
    if ctx.reference is not None:
        if perplexity.tokens_digest(tokens[: starts[-1] + spec.context]) != ctx.reference.tokens_digest:
            raise UserError(f"the evaluation tokens differ from those of {ctx.reference.file} "
                            "(another text or tokenizer): re-run benchmark_original.py")
        if n_kld_tokens > 0:
            ref_array = perplexity.open_reference(ctx.out_dir / ctx.reference.kld_reference_file, n_kld_tokens)
    return perplexity.evaluate(backend, tokens, spec, reference=ref_array)


def _mmlu(ctx: Context, done: list, save: Callable[[list], None]) -> dict:
    return mmlu.evaluate(ctx.backend, ctx.tokenizer, ctx.data.mmlu_sample, ctx.data.mmlu_prompts,
                         done=done, on_progress=save)


def _generation(ctx: Context, done: list, save: Callable[[list], None]) -> dict:
    reference_outputs = ctx.reference.output_texts if ctx.reference is not None else None
    return generation.evaluate(ctx.backend, ctx.tokenizer, ctx.data.requests, ctx.data.request_prompts,
                               ctx.data.settings.max_new_tokens, ctx.data.settings.timed_per_task, reference_outputs,
                               done=done, on_progress=save)


def _describe(stage: Stage, data: EvalData) -> str:
    settings = data.settings
    if stage is Stage.PERPLEXITY:
        n_windows = len(perplexity.window_starts(len(data.tokens), settings.window_spec))
        return (f"perplexity on {n_windows} windows of {settings.context} tokens (KLD on "
                f"{min(settings.kld_windows, n_windows)})")
    if stage is Stage.MMLU:
        return f"MMLU on {len(data.mmlu_sample)} questions ({settings.mmlu_shots}-shot)"
    n_timed = len(generation.timed_indices(data.requests, settings.timed_per_task))
    return (f"{len(data.requests)} greedy generations of {settings.max_new_tokens} tokens, batched "
            f"({n_timed} of them also timed one at a time)")


STAGES: dict[Stage, Callable[[Context, list, Callable[[list], None]], dict]] = {
    Stage.PERPLEXITY: _perplexity,
    Stage.MMLU: _mmlu,
    Stage.GENERATION: _generation,
}


def check_skip(variant: Variant, skip: tuple[Stage, ...]) -> None:
    if variant is Variant.ORIGINAL and skip:
        raise UserError("the original run is every variant's reference: it cannot skip stages")


@dataclass(frozen=True)
class RunSpec:
    """What one benchmark run measures and where its result goes (the same settings for every variant
    live in `data.settings`)."""
    variant: Variant
    model_id: str  # as the user named it (hub id or directory)
    model_hash: str
    data: EvalData  # from inputs.load_data()
    out_dir: Path
    tag: str | None = None  # tells plans of one variant apart: the plan hash
    skip: tuple[Stage, ...] = ()
    resume: bool = False  # continue from the run's checkpoint

    @property
    def stem(self) -> str:
        return result_stem(self.variant, self.model_hash, self.data.settings.digest, self.tag)


def run(spec: RunSpec, backend: Backend, tokenizer, extra: dict | None = None) -> Path:
    """Run every stage on `backend` (but those in spec.skip) and write the result, with `extra` at
    its top level (plan hash, GGUF read-back, ...). Finished stages are checkpointed; spec.resume
    continues from them."""
    variant, data, settings = spec.variant, spec.data, spec.data.settings
    check_skip(variant, spec.skip)
    out_dir = fileio.ensure_writable_dir(spec.out_dir)
    json_path = out_dir / f"{spec.stem}.json"
    reference = None if variant is Variant.ORIGINAL else load_reference(out_dir, spec.model_hash, data)
    memory_after_load = memory.snapshot()
    memory.reset_gpu_peak()
    started = time.time()
    weights: WeightsReport = backend.weights_report()
    fingerprint = json.loads(json.dumps({"variant": variant.value, "tag": spec.tag, "model_hash": spec.model_hash,
                                         "settings": settings.digest, "weights": weights.to_json(),
                                         "reference": reference and reference.created_utc}))  # as saved
    ckpt = Checkpoint(out_dir, spec.stem, fingerprint, spec.resume)
    resumed = sorted(ckpt.state["stages"]) + sorted(f"{k} (partial)" for k in ckpt.state["partial"])
    ctx = Context(backend, tokenizer, data, reference, out_dir, spec.stem, ckpt, variant)
    metrics: dict = {"weights": weights.to_json(), "memory_after_load": memory_after_load}

    finished = ckpt.finished(Stage.PERPLEXITY.value)
    if finished and "kld_reference" in finished and not ckpt.file(".logprobs.npy").is_file():
        log("--resume: the checkpoint's KLD reference file is gone; perplexity runs again")
        ckpt.discard(Stage.PERPLEXITY.value)
    with memory.GpuPeak() as gpu_peak:  # NVML's device memory sampled through the stages (llama.cpp too)
        for stage, compute in STAGES.items():
            if stage not in spec.skip:
                metrics[stage.value] = ckpt.stage(stage.value,
                                                  lambda done, save, compute=compute: compute(ctx, done, save))
    metrics["memory_peak"] = memory.snapshot(gpu_peak)
    metrics["eval_seconds"] = time.time() - started

    result = document(name=json_path.name, variant=variant, tag=spec.tag, skipped=spec.skip, model_id=spec.model_id,
                      model_hash=spec.model_hash, settings=settings.to_json(), backend=backend.describe(),
                      environment=environment.environment(), created_utc=environment.timestamp(), resumed=resumed,
                      extra=extra or {}, metrics=metrics)
    if reference is not None:
        result[COMPARISON] = compare(Result(result), reference)
    logprobs = ckpt.file(".logprobs.npy")
    if logprobs.is_file():  # the new reference goes in together with its result
        os.replace(logprobs, out_dir / logprobs.name)
    fileio.write_json_atomic(json_path, result)
    ckpt.remove()
    return json_path


def planned_run(spec: RunSpec) -> list[str]:
    """The --dry-run description of run()."""
    settings = spec.data.settings
    stages = [_describe(stage, spec.data) for stage in STAGES if stage not in spec.skip]
    lines = [f"evaluate {spec.variant.value} on {settings.device}, settings {settings.digest}: " + "; ".join(stages)]
    checkpoint = spec.out_dir / CHECKPOINT_DIR / f"{spec.stem}.json"
    if spec.resume:
        lines.append(f"resume from {checkpoint}" if checkpoint.is_file() else f"start fresh (no {checkpoint})")
    lines.append(f"write {spec.out_dir / (spec.stem + '.json')}"
                 + (f" and {spec.stem}.logprobs.npy" if spec.variant is Variant.ORIGINAL else ""))
    return lines


def summary_line(path: Path) -> str:
    result = read_result(path)
    parts = [f"{result.variant}: ppl {result.ppl.mean:.3f}"]
    if result.mmlu_accuracy is not None:
        parts.append(f"MMLU {100 * result.mmlu_accuracy.mean:.1f}% (n={result.mmlu_accuracy.n})")
    if result.has_generation:
        parts.append(f"{result.decode_tokens_per_s:.1f} tok/s")
    parts.append(f"{result.bits_per_weight:.2f} bpw")
    if result.kld is not None:
        parts.insert(1, f"KLD {result.kld.mean:.4f}")
    return ", ".join(parts)
