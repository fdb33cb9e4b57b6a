"""Build llama.cpp once from the source that `llama-cpp-python==0.3.36` vendors, for both its tools and
its Python bindings, and find them.

`python -m ewq.commands.setup llamacpp` downloads the source package (no binary) and unpacks two
things from it under .cache/llama.cpp: its vendor/llama.cpp (without the models/ folder of test
vocabularies) as src/, and its pure-Python package llama_cpp/ as python/. One cmake build with
shared libraries makes llama-quantize, llama-imatrix, llama-perplexity, llama-bench and libllama
(with libggml*) in build/bin; `install_bindings` then copies the Python package into the venv and
links its lib/ to those libraries, so the tools and the bindings run the very same compiled
llama.cpp and nothing is compiled twice. `--cuda` builds with -DGGML_CUDA=ON (a stamp per mode: a
change of mode rebuilds). cmake's output goes to .cache/llama.cpp/build.log; a failure names it and
shows its last lines.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..assets import CACHE_DIR, pip_download
from ..errors import ToolError, UserError
from ..fileio import staged_dir

SDIST_SPEC = "llama-cpp-python==0.3.36"
LLAMA_DIR = CACHE_DIR / "llama.cpp"
SOURCE_DIR = LLAMA_DIR / "src"
PYTHON_DIR = LLAMA_DIR / "python"  # the sdist's llama_cpp/ package, unbuilt
BUILD_DIR = LLAMA_DIR / "build"
BUILD_LOG = LLAMA_DIR / "build.log"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
# The native build (-march=native) compiles ggml's AMX kernels where the CPU lists AMX. A virtual machine
# may list it without enabling its tile state: there the first Q8_0/Q4 matmul dies of SIGILL at `tilezero`
# (seen on a 2-core Xeon VM, 2026-12-06). Explicit -mno-* flags win over -march=native in whatever order
# (gcc and clang).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
X86 = platform.machine() in ("x86_64", "AMD64")  # where NO_AMX_FLAGS apply
LIBRARY = "llama"  # the cmake target of libllama.so, which the bindings load
BINDINGS_DIST = "llama_cpp_python-0.3.36.dist-info"
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


def unpack_source(target: Path = SOURCE_DIR, python_target: Path = PYTHON_DIR) -> Path:
    """The vendored llama.cpp in `target` and the bindings' Python package in `python_target`/llama_cpp,
    both from one download of the source package (each moved into place whole)."""
    if (target / "CMakeLists.txt").is_file() and (python_target / "llama_cpp" / "__init__.py").is_file():
        return target
    for directory in (target.parent, python_target.parent):
        directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        sdist = pip_download(SDIST_SPEC, Path(download_dir), source=True)
        root = sdist.name.removesuffix(".tar.gz")
        for destination, prefix in ((target, f"{root}/vendor/llama.cpp/"), (python_target, f"{root}/llama_cpp/")):
            if destination.exists():
                continue
            keep = "llama_cpp/" if destination is python_target else ""
            with staged_dir(destination, ".unpack-") as staging, tarfile.open(sdist) as archive:
                members = []
                for member in archive.getmembers():
                    if member.name.startswith(prefix) and not member.name.startswith(prefix + "models/"):
                        member.name = keep + member.name[len(prefix):]
                        if member.name:
                            members.append(member)
                archive.extractall(staging, members=members, filter="data")
    return target


def _stamp(cuda: bool) -> Path:
    return BUILD_DIR / f".built-shared-{'cuda' if cuda else 'cpu'}-no-amx"  # -no-amx: builds before it rebuild


def libraries() -> list[Path]:
    """The shared libraries of the build (libllama, libggml*), as the bindings need them."""
    return sorted(path for path in (BUILD_DIR / "bin").glob("lib*.so")
                  if path.name == f"lib{LIBRARY}.so" or path.name.startswith("libggml"))


def is_built(cuda: bool = False) -> bool:
    return (_stamp(cuda).is_file() and all((BUILD_DIR / "bin" / name).is_file() for name in TOOLS)
            and (BUILD_DIR / "bin" / f"lib{LIBRARY}.so").is_file())


def build(cuda: bool = False, jobs: int | None = None) -> Path:
    """The tools and libllama, built once per mode; cmake's output in BUILD_LOG."""
    source = unpack_source()
    if is_built(cuda):
        return BUILD_DIR / "bin"
    for stale in BUILD_DIR.glob(".built-*"):
        stale.unlink()
    configure = ["cmake", "-S", str(source), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DBUILD_SHARED_LIBS=ON", f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]
    if X86:
        configure += [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    if cuda:  # the present GPU's architecture only: minutes instead of an hour of every architecture
        configure.append("-DCMAKE_CUDA_ARCHITECTURES=native")
    compile_ = ["cmake", "--build", str(BUILD_DIR), "-j", str(jobs or os.cpu_count() or 2),
                "--target", *TOOLS, LIBRARY]
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_LOG, "w") as log:
        for step, command in (("configure", configure), ("compile", compile_)):
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise ToolError(f"building llama.cpp failed at the cmake {step} step; its log is {BUILD_LOG}:\n"
                                + "\n".join(BUILD_LOG.read_text(errors="replace").splitlines()[-15:]))
    _stamp(cuda).write_text("ok\n")
    return BUILD_DIR / "bin"


def install_bindings(site_packages: Path) -> Path:
    """The bindings' Python package copied into site_packages, its lib/ holding links to the libraries of
    our one build (no second compilation); a dist-info so that pip lists it. Replaces an earlier install."""
    if not libraries():
        raise UserError(f"no llama.cpp libraries in {BUILD_DIR / 'bin'}; run scripts/setup.sh")
    unpack_source()
    package = site_packages / "llama_cpp"
    staging = Path(tempfile.mkdtemp(prefix=".llama_cpp-", dir=site_packages))
    try:
        shutil.copytree(PYTHON_DIR / "llama_cpp", staging / "llama_cpp")
        lib = staging / "llama_cpp" / "lib"
        shutil.rmtree(lib, ignore_errors=True)
        lib.mkdir()
        for library in libraries():
            (lib / library.name).symlink_to(library.resolve())
        for old in [package, *site_packages.glob("llama_cpp_python-*.dist-info")]:
            shutil.rmtree(old, ignore_errors=True)
        (staging / "llama_cpp").rename(package)
        dist = site_packages / BINDINGS_DIST
        dist.mkdir()
        name, version = BINDINGS_DIST.removesuffix(".dist-info").rsplit("-", 1)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        (dist / "INSTALLER").write_text("ewq (links to the libraries of .cache/llama.cpp/build)\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return package


def bindings_installed(site_packages: Path) -> bool:
    """The bindings of install_bindings are in place: every library linked, every link resolving."""
    lib = site_packages / "llama_cpp" / "lib"
    return (site_packages / BINDINGS_DIST / "INSTALLER").is_file() and bool(libraries()) and all(
        (lib / library.name).resolve() == library.resolve() for library in libraries())
