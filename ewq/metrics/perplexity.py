"""Perplexity over sliding windows, and KL divergence against the original model's log-probs.

Windows: start = i*stride, length = context; each window scores only its last `stride`
tokens, so every scored token sees at least context - stride tokens of context and no token is
scored twice. Standard errors are taken across windows (tokens inside one window are
correlated, so a per-token SE would be too small).

KLD(original || variant) per scored token = sum_v p_orig(v) * (log p_orig(v) - log p_variant(v)),
computed by kld.token_kld (the project's one KLD). The original run stores log p_orig for the
first `kld_windows` windows as a float16 [tokens, vocab] array beside its result; every variant
reads it back.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..backends.base import Backend
from ..console import progress
from ..errors import UserError
from .kld import token_kld
from .stats import mean_se, percentile


@dataclass(frozen=True)
class WindowSpec:
    context: int
    stride: int
    max_windows: int
    kld_windows: int

    def validate(self) -> None:
        if not 0 < self.stride < self.context:  # a window's first token has no prediction: it is never scored
            raise UserError(f"stride must be in 1..{self.context - 1} (below the context, {self.context}), "
                            f"got {self.stride}")
        if self.kld_windows > self.max_windows:
            raise UserError(f"KLD windows ({self.kld_windows}) exceed perplexity windows ({self.max_windows})")


def window_starts(n_tokens: int, spec: WindowSpec) -> list[int]:
    starts = list(range(0, n_tokens - spec.context + 1, spec.stride))[: spec.max_windows]
    if not starts:
        raise UserError(f"evaluation text has {n_tokens} tokens, fewer than one window of {spec.context}")
    return starts


def tokens_digest(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:16]


def evaluate(backend: Backend, tokens: list[int], spec: WindowSpec,
             reference: np.ndarray | None = None, record: np.ndarray | None = None) -> dict:
    """Perplexity on every window; KLD and same-top-1 vs `reference` on the first
    kld_windows windows; if `record` is given, the log-probs of those windows are written to it.
    Windows go to the backend `batch_size` at a time; NLL, KLD and top-1 are computed on the
    backend's device and only per-token numbers come back to the host (plus `record`'s rows)."""
    starts = window_starts(len(tokens), spec)
    kld_windows = min(spec.kld_windows, len(starts))
    scored = slice(spec.context - spec.stride - 1, spec.context - 1)  # row i predicts token i+1
    window_nll, window_kld, window_top1, per_token_kld = [], [], [], []
    bar = progress(total=len(starts), desc=f"perplexity [{backend.name}]", unit="window")
    first = 0
    while first < len(starts):  # the batch size may halve inside window_logprobs (auto batching)
        windows = [tokens[start:start + spec.context] for start in starts[first:first + backend.batch_size]]
        rows = backend.window_logprobs(windows, scored)  # [batch, stride, vocab] on the device
        targets = torch.tensor([w[spec.context - spec.stride:] for w in windows], device=rows.device)
        nll = -rows.gather(2, targets[..., None]).squeeze(2)  # [batch, stride]
        window_nll.extend(nll.double().mean(dim=1).tolist())
        n_kld = max(0, min(len(windows), kld_windows - first))  # windows of this batch that feed KLD
        if n_kld:
            block = slice(first * spec.stride, (first + n_kld) * spec.stride)
            if record is not None:
                record[block] = rows[:n_kld].half().cpu().numpy().reshape(-1, rows.shape[-1])
            if reference is not None:
                _compare(rows[:n_kld], reference[block], window_kld, window_top1, per_token_kld)
        bar.update(len(windows))
        first += len(windows)
    bar.close()
    if len(window_nll) != len(starts):
        raise RuntimeError(f"perplexity scored {len(window_nll)} of {len(starts)} windows")
    nll_stats = mean_se(window_nll)
    ppl = math.exp(nll_stats.mean)
    result = {
        "settings": asdict(spec),
        "tokens_sha256_16": tokens_digest(tokens[: starts[-1] + spec.context]),
        "ppl": {"value": ppl, "se": ppl * nll_stats.se if nll_stats.se else None,
                "mean_nll": nll_stats.mean, "mean_nll_se": nll_stats.se,
                "n_windows": len(starts), "n_tokens": len(starts) * spec.stride},
        "per_window_nll": window_nll,
    }
    if reference is not None and per_token_kld:
        kld_stats = mean_se(window_kld)
        top1_stats = mean_se(window_top1)
        result["kld"] = {"mean": kld_stats.mean, "se": kld_stats.se, "p99": percentile(per_token_kld, 99),
                         "max": max(per_token_kld), "n_windows": kld_stats.n, "n_tokens": len(per_token_kld)}
        result["same_top1"] = {"mean": top1_stats.mean, "se": top1_stats.se, "n_windows": top1_stats.n,
                               "n_tokens": len(per_token_kld)}
        result["per_window_kld"] = window_kld
        result["per_window_same_top1"] = window_top1
    return result


def _compare(rows: torch.Tensor, reference: np.ndarray, window_kld: list, window_top1: list,
             per_token_kld: list) -> None:
    """KLD(reference || rows) and same top-1 per token of the windows `rows` [n, stride, vocab];
    `reference` holds their n*stride float16 rows. Appends per window and per token. One window at
    a time: the float32 copy of the reference is one window's [stride, vocab], whatever the batch."""
    stride = rows.shape[1]
    for index, window in enumerate(rows):
        part = np.array(reference[index * stride:(index + 1) * stride], dtype=np.float16)
        ref = torch.from_numpy(part).to(rows.device).float()  # [stride, vocab]
        kld = token_kld(ref, window)
        per_token_kld.extend(kld.tolist())
        window_kld.append(float(kld.mean()))
        window_top1.append(float((ref.argmax(-1) == window.argmax(-1)).double().mean()))


def open_record(path: Path, n_tokens: int, vocab: int) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n_tokens, vocab))


def open_reference(path: Path, n_tokens: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the original's log-probs {path}: {error}") from None
    if array.ndim != 2 or array.shape[0] < n_tokens:
        raise UserError(f"{path} holds {array.shape} log-probs, need {n_tokens} tokens")
    return array
