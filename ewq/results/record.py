"""The benchmark result file: its vocabulary, its layout written in one place, and its one reader.

    benchmark_results/<variant>[-<plan hash>]_<model hash>_<settings digest>.json
    {schema_version, file, variant, tag, skipped_stages, model, model_hash, settings, backend,
     environment, created_utc, resumed_stages, <extra: plan_hash, plan_file, gguf, ...>,
     metrics: {weights, memory_after_load, perplexity, mmlu?, generation?, memory_peak, eval_seconds},
     comparison_vs_original?}
Each metric writes its own sub-tree (ewq/metrics/*); `Result` reads every figure the report,
the summary line and the comparisons need, as Estimates, so no other module walks the keys.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .estimate import Estimate

RESULT_SCHEMA_VERSION = 1
COMPARISON = "comparison_vs_original"  # paired deltas against the original (bench.run.compare)


class Variant(str, Enum):
    """What a result measured."""
    ORIGINAL = "original"
    EWQ_BNB = "ewq-bnb"
    GGUF_F16 = "gguf-f16"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q6_K = "gguf-q6_k"
    GGUF_Q5_K_M = "gguf-q5_k_m"
    GGUF_Q4_K_M = "gguf-q4_k_m"
    GGUF_Q4_K_S = "gguf-q4_k_s"
    GGUF_Q3_K_M = "gguf-q3_k_m"
    GGUF_EWQ = "gguf-ewq"


LLAMA_CPP_PRESETS = (Variant.GGUF_Q3_K_M, Variant.GGUF_Q4_K_S, Variant.GGUF_Q4_K_M, Variant.GGUF_Q5_K_M,
                     Variant.GGUF_Q6_K, Variant.GGUF_Q8_0)  # llama.cpp's own mixes, by llama-quantize file type


class Stage(str, Enum):
    """The stages of a benchmark run, in order; the original runs them all (it is the reference)."""
    PERPLEXITY = "perplexity"  # perplexity, and KLD against the original's log-probs
    MMLU = "mmlu"
    GENERATION = "generation"


OPTIONAL_STAGES = (Stage.MMLU, Stage.GENERATION)


@dataclass
class WeightsReport:
    """What is really loaded, read back from the modules (HF, bitsandbytes) or the file (GGUF)."""
    weight_bytes: int
    n_weights: int
    details: dict = field(default_factory=dict)  # per engine: dtype, precisions, type histogram, file

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.n_weights if self.n_weights else 0.0

    def to_json(self) -> dict:
        return {"weight_bytes": self.weight_bytes, "n_weights": self.n_weights,
                "bits_per_weight": self.bits_per_weight, **self.details}


def result_stem(variant: Variant, model_hash: str, settings_digest: str, tag: str | None = None) -> str:
    """<variant>[-<tag>]_<model hash>_<settings digest>; the tag tells plans of one variant apart."""
    return f"{variant.value}{'-' + tag if tag else ''}_{model_hash}_{settings_digest}"


def document(*, name: str, variant: Variant, tag: str | None, skipped: tuple[Stage, ...], model_id: str,
             model_hash: str, settings: dict, backend: dict, environment: dict, created_utc: str,
             resumed: list[str], extra: dict, metrics: dict) -> dict:
    """The result file's layout (module doc), but the comparison, added under COMPARISON once the
    document can be read as a Result."""
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "file": name,
        "variant": variant.value,
        "tag": tag,
        "skipped_stages": sorted(s.value for s in skipped),
        "model": model_id,
        "model_hash": model_hash,
        "settings": settings,
        "backend": backend,
        "environment": environment,
        "created_utc": created_utc,
        "resumed_stages": resumed,
        **extra,
        "metrics": metrics,
    }


def _top(key: str, default=None) -> property:
    """A top-level field of the result file."""
    return property(lambda self: self.data.get(key, default))


def _metric(*keys: str) -> property:
    """A value under "metrics"; None where the run did not measure it."""
    return property(lambda self: self._get(*keys))


def _estimate(*keys: str, mean_key: str = "mean", n_key: str = "n") -> property:
    """An Estimate under "metrics" (mean_key / n_key: perplexity's "value", BLEU's "score", KLD's "n_windows")."""
    return property(lambda self: Estimate.from_json(self._get(*keys), mean_key=mean_key, n_key=n_key))


class Result:
    """One result file, read through named accessors; a figure a run did not measure is None.
    Every key path of the layout that is read anywhere is named once, here."""

    def __init__(self, data: dict, path: Path | None = None):
        self.data, self.path = data, path

    @classmethod
    def is_result(cls, data) -> bool:
        return isinstance(data, dict) and {"variant", "metrics", "model_hash", "settings"} <= data.keys()

    def _get(self, *keys):
        node = self.data["metrics"]
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    # identity: str, except tag / plan_file (str | None), settings / environment (dict), skipped_stages (list)
    variant = _top("variant")
    tag = _top("tag")
    file = _top("file")
    model = _top("model")
    model_hash = _top("model_hash")
    settings = _top("settings")
    created_utc = _top("created_utc", "")
    environment = _top("environment", {})
    skipped_stages = _top("skipped_stages", [])
    plan_file = _top("plan_file")
    gguf_file = property(lambda self: (self.data.get("gguf") or {}).get("file"))  # str | None: GGUF variants

    @property
    def label(self) -> str:
        return f"{self.variant}-{self.tag[:8]}" if self.tag else self.variant

    @property
    def is_original(self) -> bool:
        return self.variant == Variant.ORIGINAL.value

    @property
    def settings_digest(self) -> str:
        return self.settings["digest"]

    eval_seconds = _metric("eval_seconds")  # float: every stage, loading excluded

    # weights: int, float
    weight_bytes = _metric("weights", "weight_bytes")
    bits_per_weight = _metric("weights", "bits_per_weight")

    @property
    def peak_memory_bytes(self) -> int | None:
        """On GPU torch's peak allocation, or, where torch allocated nothing (llama.cpp), the peak of NVML's
        device memory the run added; else the peak RSS of the process."""
        peak = self._get("memory_peak") or {}
        if "torch_peak_allocated_bytes" in peak:  # a GPU run: device memory, never the host's in its place
            return peak["torch_peak_allocated_bytes"] or peak.get("nvml_run_peak_bytes") or None
        return peak.get("peak_rss_bytes") or None

    # perplexity and KLD: Estimates over windows; per-window lists of float
    tokens_digest = _metric("perplexity", "tokens_sha256_16")
    ppl = _estimate("perplexity", "ppl", mean_key="value", n_key="n_windows")
    per_window_nll = _metric("perplexity", "per_window_nll")
    kld = _estimate("perplexity", "kld", n_key="n_windows")
    per_window_kld = _metric("perplexity", "per_window_kld")
    same_top1 = _estimate("perplexity", "same_top1", n_key="n_windows")
    kld_reference_file = _metric("perplexity", "kld_reference", "file")

    # MMLU: accuracy over questions; 0/1 per question; {subject: {mean, se, n}}
    mmlu_accuracy = _estimate("mmlu", "accuracy")
    per_question_correct = _metric("mmlu", "per_question_correct")
    mmlu_per_subject = _metric("mmlu", "per_subject")

    # generation: floats, and Estimates over summaries / outputs
    decode_tokens_per_s = _metric("generation", "decode_tokens_per_s", "value")
    latency_p50_s = _metric("generation", "latency_s", "p50")
    bleu = _estimate("generation", "summarization", "bleu", mean_key="score")
    rougeL_vs_original = _estimate("generation", "rougeL_vs_original")

    @property
    def has_generation(self) -> bool:
        return self._get("generation") is not None

    @property
    def output_texts(self) -> list[str]:
        return [o["text"] for o in self._get("generation", "outputs") or []]

    @property
    def rouge(self) -> dict[str, Estimate | None]:
        rouge = self._get("generation", "summarization", "rouge") or {}
        return {kind: Estimate.from_json(value) for kind, value in rouge.items()}


def read_result(path: Path) -> Result | None:
    """The result in `path`, or None for a file that is not a readable result."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return Result(data, Path(path)) if Result.is_result(data) else None
