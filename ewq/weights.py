"""Weights I/O: find a model's safetensors files and read tensors one at a time.

Nothing here builds the model: plan creation needs at most one tensor in memory at a time.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .errors import UserError
from .fileio import read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HASH_SAMPLE_BYTES = 4096  # bytes hashed at each of three places of every tensor
_BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block of a checkpoint tensor (`model.layers.3.mlp…` -> 3), or None."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0   # where the tensor's bytes start in the file
    nbytes: int = 0

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class ModelFiles:
    """A local model directory: its config and safetensors weight files."""

    root: Path
    config: dict
    weight_files: tuple[Path, ...]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded to the HF cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {model} is not a directory")
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise UserError(f"model not found: {model} (neither a local directory nor a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as error:  # offline, unknown repo, gated repo ...
        raise UserError(f"cannot fetch model '{model}' from the hub: {type(error).__name__}: {str(error).splitlines()[0]}") from None


def open_model(model: str) -> ModelFiles:
    root = resolve_model_dir(model)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise UserError(f"{root} has no config.json: not a Hugging Face model directory")
    config = read_json(config_path)
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForCausalLM") for name in architectures):
        raise UserError(f"{root} is not a causal LM (architectures: {architectures or 'none'})")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise UserError(f"{index} is not a valid safetensors index: {error}") from None
        files = tuple(root / name for name in sorted(set(weight_map.values())))
    elif (root / SINGLE_FILE).is_file():
        files = (root / SINGLE_FILE,)
    else:
        files = tuple(sorted(root.glob("*.safetensors")))
    if not files:
        raise UserError(f"{root} has no safetensors weights (convert .bin checkpoints to safetensors first)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"safetensors shard(s) missing: {', '.join(missing)}")
    return ModelFiles(root=root, config=config, weight_files=files)


def read_header(path: Path) -> tuple[bytes, dict]:
    """The raw JSON header of a safetensors file and its parsed form."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError("header length out of range")
            raw = handle.read(length)
        return raw, json.loads(raw)
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a valid safetensors file: {error}") from None


def list_tensors(files: ModelFiles) -> list[TensorInfo]:
    tensors = []
    for path in files.weight_files:
        raw, header = read_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            tensors.append(TensorInfo(name=name, file=path, dtype=entry["dtype"], shape=tuple(entry["shape"]),
                                      offset=8 + len(raw) + begin, nbytes=end - begin))
    return tensors


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_tensors(tensors: list[TensorInfo]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield (info, tensor) one at a time, each read into memory of its own with plain reads: unlike
    a memory map, nothing of the file stays resident once the tensor is dropped (a loader's RAM bound)."""
    for info in tensors:
        if info.dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{info.file}: tensor {info.name} has dtype {info.dtype}, which this reader does not know")
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb") as handle:
            handle.seek(info.offset)
            if handle.readinto(buffer) != info.nbytes:
                raise UserError(f"{info.file} is truncated inside tensor {info.name}")
        tensor = torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[info.dtype]) if info.nbytes else \
            torch.empty(0, dtype=SAFETENSORS_DTYPES[info.dtype])
        yield info, tensor.reshape(info.shape)


def iter_tensors(tensors: list[TensorInfo]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield (info, tensor) one at a time; the file is memory-mapped, one tensor is materialised."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in tensors:
        by_file.setdefault(info.file, []).append(info)
    for path, infos in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for info in infos:
                yield info, handle.get_tensor(info.name)


def model_hash(files: ModelFiles) -> str:
    """Deterministic 16-hex id of a model: its config, every safetensors header, and a sample of
    every tensor's bytes (start, middle, end). Headers alone cannot tell two fine-tunes of one
    architecture apart; a full read of a large model would cost a minute per run."""
    digest = hashlib.sha256()
    digest.update(json.dumps(files.config, sort_keys=True).encode())
    for path in files.weight_files:
        raw_header, header = read_header(path)
        digest.update(raw_header)
        data_start = 8 + len(raw_header)
        spans = sorted(entry["data_offsets"] for name, entry in header.items() if name != "__metadata__")
        with open(path, "rb") as handle:
            for begin, end in spans:
                for offset in sorted({begin, (begin + end) // 2, max(begin, end - HASH_SAMPLE_BYTES)}):
                    handle.seek(data_start + offset)
                    digest.update(handle.read(min(HASH_SAMPLE_BYTES, end - offset)))
    return digest.hexdigest()[:16]
