"""Build llama.cpp's tools from the source that `llama-cpp-python==0.3.36` vendors, and find them.

`python -m ewq.commands.build_llamacpp` downloads the source package (no binary), unpacks its
vendor/llama.cpp (without the models/ folder of test vocabularies) under .cache/llama.cpp/src,
and builds llama-quantize, llama-imatrix, llama-perplexity and llama-bench with cmake into
.cache/llama.cpp/build/bin. A stamp makes a second run a no-op. `--cuda` builds with
-DGGML_CUDA=ON. The Python bindings are installed by scripts/setup.sh with pip from the same
source package, so tools and bindings run the same llama.cpp.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..assets import CACHE_DIR, pip_download
from ..errors import ToolError, UserError

SDIST_SPEC = "llama-cpp-python==0.3.36"
LLAMA_DIR = CACHE_DIR / "llama.cpp"
SOURCE_DIR = LLAMA_DIR / "src"
BUILD_DIR = LLAMA_DIR / "build"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
CONVERTER = SOURCE_DIR / "convert_hf_to_gguf.py"


def bin_dir() -> Path:
    return Path(os.environ.get("EWQ_LLAMA_CPP_BIN", BUILD_DIR / "bin"))


def tool(name: str) -> Path:
    path = bin_dir() / name
    if not path.is_file():
        raise UserError(f"llama.cpp tool {name} not found in {bin_dir()}; run scripts/setup.sh "
                        "(or set EWQ_LLAMA_CPP_BIN to a folder holding the llama.cpp binaries)")
    return path


def converter() -> Path:
    if not CONVERTER.is_file():
        raise UserError(f"{CONVERTER} not found; run scripts/setup.sh")
    return CONVERTER


def unpack_source(target: Path = SOURCE_DIR) -> Path:
    if (target / "CMakeLists.txt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        sdist = pip_download(SDIST_SPEC, Path(download_dir), source=True)
        staging = Path(tempfile.mkdtemp(prefix=".src-", dir=target.parent))
        try:
            with tarfile.open(sdist) as archive:
                prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
                members = []
                for member in archive.getmembers():
                    if member.name.startswith(prefix) and not member.name.startswith(prefix + "models/"):
                        member.name = member.name[len(prefix):]
                        if member.name:
                            members.append(member)
                archive.extractall(staging, members=members, filter="data")
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build(cuda: bool = False, jobs: int | None = None) -> Path:
    source = unpack_source()
    stamp = BUILD_DIR / f".built-{'cuda' if cuda else 'cpu'}"
    if stamp.is_file() and all((BUILD_DIR / "bin" / name).is_file() for name in TOOLS):
        return BUILD_DIR / "bin"
    configure = ["cmake", "-S", str(source), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DBUILD_SHARED_LIBS=OFF", f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]
    compile_ = ["cmake", "--build", str(BUILD_DIR), "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS]
    for step, command in (("configure", configure), ("compile", compile_)):
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
            raise ToolError(f"building llama.cpp failed at the cmake {step} step (its errors are printed above)")
    stamp.write_text("ok\n")
    return BUILD_DIR / "bin"
