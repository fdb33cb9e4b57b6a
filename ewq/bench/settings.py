"""Evaluation settings: the same for every variant, so that results can be compared.

Three presets (standard, the default; full; quick); any flag given explicitly overrides its preset value. The digest of
the settings is part of every result's name: variants with equal settings find each other. The
device is recorded with the settings but is not part of the digest: a GGUF variant run on the CPU of
a GPU host still pairs with the original measured on its GPU (the same tokens, windows, questions).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..data import hub
from ..data.prompts import WIKI
from ..errors import UserError
from ..metrics import perplexity

GENSIM_WIKI, WIKITEXT2 = "gensim-wiki", "wikitext2"


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
    summaries_from: str = WIKI  # added later: left out of the digest at its default (old results keep theirs)
    timed_per_task: int = 2     # added later, likewise

    @property
    def window_spec(self) -> perplexity.WindowSpec:
        return perplexity.WindowSpec(self.context, self.stride, self.ppl_windows, self.kld_windows)

    @property
    def digest(self) -> str:
        values = {k: v for k, v in asdict(self).items()
                  if k not in NOT_DIGESTED and (k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k])}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        return {**asdict(self), "digest": self.digest}


# settings added after results existed, at their defaults. timed_per_task only says which requests are also
# timed one at a time: every metric but speed is computed on the same inputs as before it existed
LATER_DEFAULTS = {"summaries_from": WIKI, "timed_per_task": 2}
NOT_DIGESTED = {"device"}  # where a variant ran is recorded (settings.device, environment), not what pairs
FULL = dict(eval_text=GENSIM_WIKI, context=512, stride=256, ppl_windows=128, kld_windows=32, mmlu_per_subject=20,
            mmlu_shots=0, gen_per_task=3, summaries=100, max_new_tokens=128, seed=1234,
            summaries_from=WIKI, timed_per_task=2)
# the default: half of full's perplexity compute for 3/4 of its scored tokens (a window of 512 scores its last
# 384, each scored token sees at least 128 before it), KLD on as many windows as full's, each of 384 tokens
# (12,288 tokens against 8,192), and MMLU at 3 questions per subject (171): what MMLU can show on the
# default model, which answers at chance (docs/benchmarks.md)
STANDARD = dict(FULL, stride=384, ppl_windows=64, kld_windows=32, mmlu_per_subject=3)
QUICK = dict(FULL, ppl_windows=8, kld_windows=8, mmlu_per_subject=2, mmlu_shots=0, gen_per_task=1, summaries=3,
             max_new_tokens=32)
PRESETS = {"standard": STANDARD, "full": FULL, "quick": QUICK}
DEFAULT_PRESET = "standard"


def preset_name(args) -> str:
    """--quick is short for --preset quick; the two together must agree."""
    chosen = getattr(args, "preset", None)
    if getattr(args, "quick", False):
        if chosen not in (None, "quick"):
            raise UserError(f"--quick is --preset quick, not --preset {chosen}: give one of them")
        return "quick"
    return chosen or DEFAULT_PRESET


def settings_from_args(args, device: str) -> EvalSettings:
    preset = PRESETS[preset_name(args)]
    values = {key: getattr(args, key) if getattr(args, key) is not None else default for key, default in preset.items()}
    if values["summaries_from"] not in (WIKI, "billsum") and not hub.is_local_table(values["summaries_from"]):
        raise UserError(f"--summaries-from takes {WIKI}, billsum or a .parquet/.jsonl/.csv table with billsum's "
                        f"columns, got {values['summaries_from']}")
    if values["mmlu_per_subject"] <= 0:
        raise UserError(f"--mmlu-per-subject must be positive, got {values['mmlu_per_subject']}")
    settings = EvalSettings(device=device, **values)
    settings.window_spec.validate()
    return settings
