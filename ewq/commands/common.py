"""What every terminal script shares: the parser, the error wrapper, argument types, the common
arguments and the default directories (one constant each)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from .. import assets
from ..errors import UserError

EXIT_USAGE = 2
PLANS_DIR = Path("quantized_models")  # plans, quantize scripts, GGUF files, the importance matrix
RESULTS_DIR = Path("benchmark_results")  # result JSON, KLD references, studies
REPORTS_DIR = Path("reports")  # report.md and its figures
DEVICES = ("auto", "cpu", "cuda")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def batch_size(text: str) -> int | None:
    """--batch-size: a positive integer, or auto (None)."""
    if text == "auto":
        return None
    try:
        return positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text}") from None


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with the project's exit code for usage errors (2, the argparse default)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        """One line, like every other refusal: `error: ...`, exit 2."""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# --- arguments shared by several scripts ----------------------------------------------------------

def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=assets.default_model(), help="HF hub id or local model directory")


def add_plan_args(parser: argparse.ArgumentParser, what: str = "plan JSON") -> None:
    parser.add_argument("--plan", type=Path, help=f"{what} (default: the newest plan for this model's hash in --plans-dir)")
    parser.add_argument("--plans-dir", type=Path, default=PLANS_DIR, help="where plans are looked up")


def add_dry_run_arg(parser: argparse.ArgumentParser, what: str = "validate the inputs, print what would run") -> None:
    parser.add_argument("--dry-run", action="store_true", help=f"{what}, write nothing")


def add_benchmark_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of every benchmark script: model, device, output, run control, and the evaluation settings."""
    from ..bench.settings import DEFAULT_PRESET, GENSIM_WIKI, PRESETS, WIKITEXT2
    from ..results.record import OPTIONAL_STAGES

    add_model_arg(parser)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help=f"evaluation settings (default {DEFAULT_PRESET}): standard (the main job in about 22 "
                             "minutes on 2 CPU cores), full (twice the perplexity windows, 20 MMLU questions per "
                             "subject), quick (a smoke run)")
    parser.add_argument("--quick", action="store_true", help="--preset quick: a smoke run of a few minutes on CPU")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same variant and settings from its checkpoint")
    add_dry_run_arg(parser)
    parser.add_argument("--skip", action="append", choices=[s.value for s in OPTIONAL_STAGES], default=[],
                        help="leave a stage out (repeatable); perplexity and KLD always run")
    group = parser.add_argument_group("evaluation settings (each overrides its --preset value)")
    group.add_argument("--eval-text", help=f"'{GENSIM_WIKI}' (offline, shipped), '{WIKITEXT2}' (hub), a .txt file, "
                                           "or a .parquet/.jsonl/.csv table with wikitext's `text` column")
    group.add_argument("--context", type=positive_int, help="perplexity window length in tokens")
    group.add_argument("--stride", type=positive_int, help="tokens scored per window (window step)")
    group.add_argument("--ppl-windows", type=positive_int, help="perplexity windows at most")
    group.add_argument("--kld-windows", type=non_negative_int, help="first windows whose full log-probs feed KLD")
    group.add_argument("--mmlu-per-subject", type=int, help="MMLU questions per subject (stratified, seeded)")
    group.add_argument("--mmlu-shots", type=non_negative_int, help="k-shot exemplars per MMLU question")
    group.add_argument("--gen-per-task", type=non_negative_int, help="prompts each for code, math and reasoning")
    group.add_argument("--summaries", type=non_negative_int, help="summarization items at most")
    group.add_argument("--summaries-from", help="'wiki' (offline, shipped), 'billsum' (hub), or a .parquet/.jsonl/.csv "
                                                "table with billsum's columns text, summary")
    group.add_argument("--max-new-tokens", type=positive_int, help="greedy tokens per generation request")
    group.add_argument("--timed-per-task", type=positive_int,
                       help="generation requests of each task timed one at a time (speed, latency); every request "
                            "is generated, batched, for text quality")
    group.add_argument("--seed", type=int, help="seed of the MMLU sample and exemplars")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies


def add_hf_engine_args(parser: argparse.ArgumentParser) -> None:
    """How the Hugging Face benchmarks run the model: batch size, compute dtype, device map."""
    from ..backends.hf import DTYPES

    group = parser.add_argument_group("engine (how the model runs; recorded in the result's backend)")
    group.add_argument("--batch-size", type=batch_size, default="auto",
                       help="sequences per forward pass for perplexity and MMLU and per decoding step for the "
                            "generated texts, or auto: a size per device and job, halved on out-of-memory "
                            "(timed generation is always batch 1)")
    group.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                       help="compute dtype; auto: the checkpoint's dtype on GPU, float32 on CPU")
    group.add_argument("--device-map", choices=DEVICE_MAPS,
                       help="spread the model with accelerate over the GPUs, then CPU memory (none: one device)")


# --- running a script -------------------------------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `with atomic_path(...)` removes its
    temporary file and running llama.cpp tools are killed (subprocess.run does that on any exception)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's main; turn UserError into one line on stderr and exit 2; on SIGTERM or
    Ctrl-C leave finished files as they were and no temporary ones."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted; finished files are unchanged (benchmarks: --resume continues)", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated; finished files are unchanged (benchmarks: --resume continues)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


def dry_run(lines: list[str]) -> None:
    """What a script would do, on stdout; called after every input was validated."""
    print("dry run: inputs are valid; nothing was written. Would:")
    for line in lines:
        print(f"  - {line}")
