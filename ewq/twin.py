"""A function-preserving twin of a model, on no quantization grid: its residual stream rotated.

The default model was dequantized from a GGUF, so its matrices lie on Q4_1's grid and its embedding
on Q8_0's, which those types reproduce almost exactly: an advantage no trained model gives a type.
The twin computes the same function (computational invariance, as in QuaRot and SliceGPT): with Q
a seeded random orthogonal [hidden, hidden] matrix, every vector of the residual stream is rotated,
h' = h·Q. RMSNorm commutes with the rotation once its weight g is folded into the matrices that
read its output:
    embedding      E' = E·Q
    read h         W' = W·diag(g)·Q     q/k/v_proj (input_layernorm's g), gate/up_proj
                                        (post_attention_layernorm's g), lm_head (the final norm's g)
    write h        W' = Qᵀ·W            o_proj, down_proj
    every norm     g' = 1
A tied head is untied first (the final norm must fold into it, not into the embedding). Every
matrix is then a dense mix of the source's rows: on no type's grid, at the same outputs up to the
storage dtype's rounding. Llama-style blocks (Llama, Qwen2, Mistral: RMSNorm before attention and
MLP, no bias on the residual writers); other layouts are refused.

The twin's directory holds twin.json (source, seed, dtype), which tells the report what it is.
benchmarks/rotated_twin.py measures its KLD to the source and which grid its matrices lie on.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .backends.hf import dtype_name

MARKER = "twin.json"  # in the twin's directory: what it was made from
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def random_rotation(size: int, seed: int) -> torch.Tensor:
    """A uniformly random orthogonal [size, size] matrix (float64): QR of a Gaussian, signs fixed."""
    gaussian = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


def rotate(tensors: dict[str, torch.Tensor], rotation: torch.Tensor) -> dict[str, torch.Tensor]:
    """The twin's tensors (float64) from the source's (module doc); lm_head.weight always written."""
    out = {name: t.double() for name, t in tensors.items()}
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"].clone())
    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, out) if m})
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in layers:
        prefix = f"model.layers.{i}."
        for norm, readers in READERS.items():
            gain = out[f"{prefix}{norm}.weight"]
            for reader in readers:
                name = f"{prefix}{reader}.weight"
                out[name] = out[name] * gain @ rotation
            out[f"{prefix}{norm}.weight"] = torch.ones_like(gain)
            expected |= {f"{prefix}{norm}.weight", *(f"{prefix}{r}.weight" for r in readers)}
        for writer in WRITERS:
            name = f"{prefix}{writer}.weight"
            if f"{prefix}{writer}.bias" in out:
                raise ValueError(f"{prefix}{writer} has a bias on the residual stream: not a layout this twin rotates")
            out[name] = rotation.T @ out[name]
            expected.add(name)
        expected |= {f"{prefix}self_attn.{p}_proj.bias" for p in "qkv"} & out.keys()  # read-side biases stay
    unknown = sorted(set(out) - expected)
    if unknown:
        raise ValueError(f"tensors this twin does not know how to rotate, e.g. {unknown[0]}")
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"] @ rotation
    out["lm_head.weight"] = out["lm_head.weight"] * out["model.norm.weight"] @ rotation
    out["model.norm.weight"] = torch.ones_like(out["model.norm.weight"])
    return out


def write_twin(source: Path, target: Path, seed: int, dtype: torch.dtype) -> Path:
    """The twin's model directory (config untied, tokenizer files copied); kept if already there."""
    from safetensors.torch import load_file, save_file

    from . import weights
    from .fileio import atomic_path

    if (target / "model.safetensors").is_file() and (target / MARKER).is_file():
        return target
    files = weights.open_model(str(source))
    tensors = {}
    for path in files.weight_files:
        tensors.update(load_file(str(path)))
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    twin = {name: t.to(dtype).contiguous() for name, t in rotate(tensors, random_rotation(hidden, seed)).items()}
    target.mkdir(parents=True, exist_ok=True)
    for item in Path(files.root).iterdir():
        if item.is_file() and not item.name.startswith("model") and item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    config = json.loads((Path(files.root) / "config.json").read_text())
    config.update(tie_word_embeddings=False, torch_dtype=dtype_name(dtype))
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with atomic_path(target / "model.safetensors") as temp:
        save_file(twin, str(temp), metadata={"format": "pt"})
    marker = {"source": str(source), "seed": seed, "dtype": config["torch_dtype"]}
    (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: its presence means complete
    return target


def twin_of(model_dir: str | Path) -> dict | None:
    """What a twin directory was made from (its twin.json), or None for any other model."""
    try:
        return json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
