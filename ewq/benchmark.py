"""One benchmark run: load a variant through a backend, run every metric, write one JSON.

Every variant is measured with the same EvalSettings: the same token windows, MMLU questions,
prompts, greedy decoding and memory measurement. Results land in
    <out-dir>/<variant>_<model_hash>_<settings_hash>.json
so that a re-run replaces its own file and variants with equal settings find each other.
The original run also writes <...>.logprobs.npy, the reference for every variant's KLD.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from argparse import ArgumentParser
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from . import assets, results
from .backends.base import Backend
from .checkpoint import CHECKPOINT_DIR, Checkpoint
from .cli import log, non_negative_int, positive_int
from .data import mmlu as mmlu_data
from .data import prompts, wiki
from .errors import UserError
from .metrics import generation, memory, mmlu, perplexity
from .metrics.stats import paired_difference

GENSIM_WIKI, WIKITEXT2 = "gensim-wiki", "wikitext2"


OPTIONAL_STAGES = ("mmlu", "generation")


class Variant(str, Enum):
    ORIGINAL = "original"
    EWQ_BNB = "ewq-bnb"
    GGUF_F16 = "gguf-f16"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q4_K_M = "gguf-q4_k_m"
    GGUF_EWQ = "gguf-ewq"


@dataclass(frozen=True)
class EvalSettings:
    device: str
    eval_text: str
    context: int
    stride: int
    ppl_windows: int
    kld_windows: int
    mmlu_per_subject: int
    mmlu_shots: int
    gen_per_task: int
    summaries: int
    max_new_tokens: int
    seed: int

    @property
    def window_spec(self) -> perplexity.WindowSpec:
        return perplexity.WindowSpec(self.context, self.stride, self.ppl_windows, self.kld_windows)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# Presets; any flag given explicitly overrides its preset value.
FULL = dict(eval_text=GENSIM_WIKI, context=512, stride=256, ppl_windows=128, kld_windows=32, mmlu_per_subject=20,
            mmlu_shots=0, gen_per_task=3, summaries=100, max_new_tokens=128, seed=1234)
QUICK = dict(FULL, ppl_windows=8, kld_windows=8, mmlu_per_subject=2, mmlu_shots=0, gen_per_task=1, summaries=3,
             max_new_tokens=32)


def add_common_args(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default=assets.default_model(), help="HF hub id or local model directory")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmark_results"))
    parser.add_argument("--quick", action="store_true", help="small limits: a smoke run of a few minutes on CPU")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same variant and settings from its checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="validate the inputs, print what would run, write nothing")
    parser.add_argument("--skip", action="append", choices=list(OPTIONAL_STAGES), default=[],
                        help="leave a stage out (repeatable); perplexity and KLD always run")
    group = parser.add_argument_group("evaluation settings (default: full preset; --quick: quick preset)")
    group.add_argument("--eval-text", help=f"'{GENSIM_WIKI}' (offline, shipped), '{WIKITEXT2}' (hub), or a .txt path")
    group.add_argument("--context", type=positive_int, help="perplexity window length in tokens")
    group.add_argument("--stride", type=positive_int, help="tokens scored per window (window step)")
    group.add_argument("--ppl-windows", type=positive_int, help="perplexity windows at most")
    group.add_argument("--kld-windows", type=non_negative_int, help="first windows whose full log-probs feed KLD")
    group.add_argument("--mmlu-per-subject", type=int, help="MMLU questions per subject (stratified, seeded)")
    group.add_argument("--mmlu-shots", type=non_negative_int, help="k-shot exemplars per MMLU question")
    group.add_argument("--gen-per-task", type=non_negative_int, help="prompts each for code, math and reasoning")
    group.add_argument("--summaries", type=non_negative_int, help="summarization items at most")
    group.add_argument("--max-new-tokens", type=positive_int, help="greedy tokens per generation request")
    group.add_argument("--seed", type=int, help="seed of the MMLU sample and exemplars")


def settings_from_args(args, device: str) -> EvalSettings:
    preset = QUICK if args.quick else FULL
    values = {key: getattr(args, key) if getattr(args, key) is not None else default for key, default in preset.items()}
    if values["mmlu_per_subject"] <= 0:
        raise UserError(f"--mmlu-per-subject must be positive, got {values['mmlu_per_subject']}")
    settings = EvalSettings(device=device, **values)
    settings.window_spec.validate()
    return settings


# --- data ------------------------------------------------------------------------------------

def load_eval_text(source: str) -> str:
    if source == GENSIM_WIKI:
        return wiki.eval_text(assets.wiki_file())
    if source == WIKITEXT2:
        try:
            from datasets import load_dataset

            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as error:
            raise UserError(f"cannot load wikitext-2-raw-v1 from the hub: {type(error).__name__}") from None
        return "".join(rows)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"evaluation text not found: {source} (use '{GENSIM_WIKI}', '{WIKITEXT2}' or a file path)")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"evaluation text {source} is empty")
    return text


@dataclass
class EvalData:
    tokens: list[int]
    mmlu_prompts: list[list[int]]
    mmlu_sample: list[mmlu_data.Question]
    request_prompts: list[list[int]]
    requests: list[prompts.Request]
    settings: EvalSettings

    @property
    def longest_sequence(self) -> int:
        """Tokens a backend must hold at once: a window, an MMLU prompt, or a prompt plus its answer."""
        return max(self.settings.context, max(map(len, self.mmlu_prompts)),
                   max(map(len, self.request_prompts)) + self.settings.max_new_tokens)


def load_data(tokenizer, settings: EvalSettings) -> EvalData:
    text = load_eval_text(settings.eval_text)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    questions = mmlu_data.load_questions(assets.mmlu_file())
    sample = mmlu_data.stratified_sample(questions, settings.mmlu_per_subject, settings.seed)
    shots = mmlu_data.exemplars(questions, sample, settings.mmlu_shots, settings.seed)
    mmlu_prompts = [tokenizer.encode(mmlu_data.prompt(q, shots.get(q.subject, [])), add_special_tokens=False)
                    for q in sample]
    requests = prompts.generation_requests(assets.wiki_file(), settings.gen_per_task, settings.summaries)
    if not requests:
        raise UserError("no generation requests: raise --gen-per-task or --summaries")
    request_prompts = [generation.prompt_tokens(tokenizer, r) for r in requests]
    return EvalData(tokens, mmlu_prompts, sample, request_prompts, requests, settings)


# --- the run ---------------------------------------------------------------------------------

def result_stem(variant: str, model_hash: str, settings: EvalSettings, tag: str | None = None) -> str:
    """<variant>[-<tag>]_<model hash>_<settings digest>; the tag tells plans of one variant apart."""
    return f"{variant}{'-' + tag if tag else ''}_{model_hash}_{settings.digest}"


def load_reference(out_dir: Path, model_hash: str, settings: EvalSettings) -> dict | None:
    path = out_dir / f"{result_stem(Variant.ORIGINAL.value, model_hash, settings)}.json"
    if not path.is_file():
        log(f"warning: no original result with these settings ({path.name}); KLD and deltas are left out")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"original result {path} is not valid JSON: {error}") from None


def compare(metrics: dict, reference: dict) -> dict:
    """Paired deltas vs the original on the same windows and questions."""
    ref = reference["metrics"]
    nll = paired_difference(metrics["perplexity"]["per_window_nll"], ref["perplexity"]["per_window_nll"])
    out = {"reference_file": reference["file"], "mean_nll_delta": nll, "ppl_ratio": math.exp(nll["mean"])}
    if "mmlu" in metrics:
        out["mmlu_accuracy_delta"] = paired_difference(metrics["mmlu"]["per_question_correct"],
                                                       ref["mmlu"]["per_question_correct"])
    return out


def _perplexity_stage(backend: Backend, data: EvalData, is_reference: bool, reference: dict | None, out_dir: Path,
                      stem: str, ckpt: Checkpoint) -> dict:
    """Perplexity on every window; the original also records its log-probs (the KLD reference)
    into a checkpoint file that is committed beside the result; variants read that reference."""
    spec = data.settings.window_spec
    starts = perplexity.window_starts(len(data.tokens), spec)
    n_kld_tokens = min(spec.kld_windows, len(starts)) * spec.stride
    if is_reference:
        if n_kld_tokens == 0:
            return perplexity.evaluate(backend, data.tokens, spec)
        with results.atomic_path(ckpt.file(".logprobs.npy")) as temp:
            vocab = backend.logprobs(data.tokens[:2]).shape[-1]
            record = perplexity.open_record(temp, n_kld_tokens, vocab)
            out = perplexity.evaluate(backend, data.tokens, spec, record=record)
            record.flush()
            del record
        out["kld_reference"] = {"file": f"{stem}.logprobs.npy", "n_tokens": n_kld_tokens, "vocab": vocab}
        return out
    ref_array = None
    if reference is not None:
        ref_digest = reference["metrics"]["perplexity"]["tokens_sha256_16"]
        if perplexity.tokens_digest(data.tokens[: starts[-1] + spec.context]) != ref_digest:
            raise UserError(f"the evaluation tokens differ from those of {reference['file']} "
                            "(another text or tokenizer): re-run benchmark_original.py")
        if n_kld_tokens > 0:
            ref_file = out_dir / reference["metrics"]["perplexity"]["kld_reference"]["file"]
            ref_array = perplexity.open_reference(ref_file, n_kld_tokens)
    return perplexity.evaluate(backend, data.tokens, spec, reference=ref_array)


def run(variant: str, backend: Backend, tokenizer, data: EvalData, model_hash: str, model_id: str,
        out_dir: Path, extra: dict | None = None, tag: str | None = None, skip: tuple[str, ...] = (),
        resume: bool = False) -> Path:
    """Run every metric on `backend` (but the stages in `skip`) and write the result; `data`
    comes from load_data(). Finished stages are checkpointed; `resume` continues from them."""
    settings = data.settings
    out_dir = results.ensure_writable_dir(out_dir)
    is_reference = variant == Variant.ORIGINAL.value
    if is_reference and skip:
        raise UserError("the original run is every variant's reference: it cannot skip stages")
    stem = result_stem(variant, model_hash, settings, tag)
    json_path = out_dir / f"{stem}.json"
    reference = None if is_reference else load_reference(out_dir, model_hash, settings)
    memory_after_load = memory.snapshot()
    memory.reset_gpu_peak()
    started = time.time()
    weights_report = backend.weights_report()
    fingerprint = json.loads(json.dumps({"variant": variant, "tag": tag, "model_hash": model_hash,
                                         "settings": settings.digest, "weights": weights_report,
                                         "reference": reference and reference["created_utc"]}))
    ckpt = Checkpoint(out_dir, stem, fingerprint, resume)
    resumed = sorted(ckpt.state["stages"]) + sorted(f"{k} (partial)" for k in ckpt.state["partial"])
    metrics: dict = {"weights": weights_report, "memory_after_load": memory_after_load}

    finished = ckpt.finished("perplexity")
    if finished and "kld_reference" in finished and not ckpt.file(".logprobs.npy").is_file():
        log("--resume: the checkpoint's KLD reference file is gone; perplexity runs again")
        ckpt.discard("perplexity")
    metrics["perplexity"] = ckpt.stage("perplexity", lambda done, save: _perplexity_stage(
        backend, data, is_reference, reference, out_dir, stem, ckpt))
    if "mmlu" not in skip:
        metrics["mmlu"] = ckpt.stage("mmlu", lambda done, save: mmlu.evaluate(
            backend, tokenizer, data.mmlu_sample, data.mmlu_prompts, done=done, on_progress=save))
    if "generation" not in skip:
        reference_outputs = None
        if reference is not None:
            reference_outputs = [o["text"] for o in reference["metrics"]["generation"]["outputs"]]
        metrics["generation"] = ckpt.stage("generation", lambda done, save: generation.evaluate(
            backend, tokenizer, data.requests, data.request_prompts, settings.max_new_tokens, reference_outputs,
            done=done, on_progress=save))
    metrics["memory_peak"] = memory.snapshot()
    metrics["eval_seconds"] = time.time() - started

    result = {
        "schema_version": results.RESULT_SCHEMA_VERSION,
        "file": json_path.name,
        "variant": variant,
        "tag": tag,
        "skipped_stages": sorted(skip),
        "model": model_id,
        "model_hash": model_hash,
        "settings": {**asdict(settings), "digest": settings.digest},
        "backend": backend.describe(),
        "environment": results.environment(),
        "created_utc": results.timestamp(),
        "resumed_stages": resumed,
        **(extra or {}),
        "metrics": metrics,
    }
    if reference is not None:
        result["comparison_vs_original"] = compare(metrics, reference)
    logprobs = ckpt.file(".logprobs.npy")
    if logprobs.is_file():  # the new reference goes in together with its result
        os.replace(logprobs, out_dir / logprobs.name)
    results.write_json_atomic(json_path, result)
    ckpt.remove()
    return json_path


def planned_run(variant: str, tag: str | None, model_hash: str, data: EvalData, out_dir: Path, resume: bool,
                skip: tuple[str, ...] = ()) -> list[str]:
    """The --dry-run description of run()."""
    settings = data.settings
    stem = result_stem(variant, model_hash, settings, tag)
    n_windows = len(perplexity.window_starts(len(data.tokens), settings.window_spec))
    stages = [f"perplexity on {n_windows} windows of {settings.context} tokens (KLD on "
              f"{min(settings.kld_windows, n_windows)})"]
    if "mmlu" not in skip:
        stages.append(f"MMLU on {len(data.mmlu_sample)} questions ({settings.mmlu_shots}-shot)")
    if "generation" not in skip:
        stages.append(f"{len(data.requests)} greedy generations of {settings.max_new_tokens} tokens")
    lines = [f"evaluate {variant} on {settings.device}, settings {settings.digest}: " + "; ".join(stages)]
    checkpoint = out_dir / CHECKPOINT_DIR / f"{stem}.json"
    if resume:
        lines.append(f"resume from {checkpoint}" if checkpoint.is_file() else f"start fresh (no {checkpoint})")
    lines.append(f"write {out_dir / (stem + '.json')}"
                 + (f" and {stem}.logprobs.npy" if variant == Variant.ORIGINAL.value else ""))
    return lines


def summary_line(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["metrics"]
    parts = [f"{data['variant']}: ppl {m['perplexity']['ppl']['value']:.3f}"]
    if "mmlu" in m:
        parts.append(f"MMLU {100 * m['mmlu']['accuracy']['mean']:.1f}% (n={m['mmlu']['accuracy']['n']})")
    if "generation" in m:
        parts.append(f"{m['generation']['decode_tokens_per_s']['value']:.1f} tok/s")
    parts.append(f"{m['weights']['bits_per_weight']:.2f} bpw")
    if "kld" in m["perplexity"]:
        parts.insert(1, f"KLD {m['perplexity']['kld']['mean']:.4f}")
    return ", ".join(parts)
