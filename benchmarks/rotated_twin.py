"""A function-preserving twin of a model, on no quantization grid: its residual stream rotated (printed).

The default model was dequantized from a GGUF, so its matrices lie on Q4_1's grid and its embedding
on Q8_0's, which those types reproduce almost exactly: an advantage no trained model gives a type.
Noise moves the weights off the grid but damages the model. The twin here computes the same
function (computational invariance, as in QuaRot and SliceGPT): with Q a seeded random orthogonal
[hidden, hidden] matrix, every vector of the residual stream is rotated, h' = h·Q. RMSNorm commutes
with the rotation once its weight g is folded into the matrices that read its output:
    embedding      E' = E·Q
    read h         W' = W·diag(g)·Q     q/k/v_proj (input_layernorm's g), gate/up_proj
                                        (post_attention_layernorm's g), lm_head (the final norm's g)
    write h        W' = Qᵀ·W            o_proj, down_proj
    every norm     g' = 1
A tied head is untied first (the final norm must fold into it, not into the embedding). Every
matrix is then a dense mix of the source's rows: on no type's grid (checked below), at the same
outputs up to the storage dtype's rounding. Llama-style blocks (Llama, Qwen2, Mistral: RMSNorm
before attention and MLP, no bias on the residual writers); other layouts are refused.

    python -m benchmarks.rotated_twin [--model DIR] [--out-dir .cache/rotated-twin-<seed>] [--seed 0]
                                      [--dtype bfloat16] [--windows 8]

prints the twin's KLD to the source on evaluation-role windows (ewq.metrics.kld, both in float32
compute), and which grid each matrix of the source and of the twin lies on.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
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

    from ewq import weights
    from ewq.fileio import atomic_path

    if (target / "model.safetensors").is_file():
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
    config.update(tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."))
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with atomic_path(target / "model.safetensors") as temp:
        save_file(twin, str(temp), metadata={"format": "pt"})
    return target


def kld_to_source(source: Path, twin: Path, windows: torch.Tensor) -> tuple[float, float]:
    """(mean, max over windows) of the mean KLD(source ‖ twin) per token, both run in float32."""
    from ewq.backends import hf
    from ewq.metrics.kld import token_kld

    per_window = []
    models = [hf.load_model(str(path), "cpu", torch.float32) for path in (source, twin)]
    with torch.inference_mode():
        for window in windows:
            reference, logits = (m(input_ids=window[None], use_cache=False).logits[0].float() for m in models)
            per_window.append(float(token_kld(reference, logits).mean()))
    return sum(per_window) / len(per_window), max(per_window)


def grids(model_dir: Path) -> dict[str, int]:
    """Matrices per grid they lie on (benchmarks.off_grid.grid_step), 'none' for no grid."""
    from safetensors.torch import load_file

    from benchmarks.off_grid import grid_step

    out: dict[str, int] = {}
    for tensor in load_file(str(model_dir / "model.safetensors")).values():
        if tensor.dim() == 2:
            try:
                name = grid_step(tensor)[0]
            except ValueError:
                name = "none"
            out[name] = out.get(name, 0) + 1
    return out


def main(argv=None) -> None:
    from ewq import assets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Llama-style model directory (default: the offline default)")
    parser.add_argument("--out-dir", type=Path, help="where the twin is written (default: .cache/rotated-twin-<seed>)")
    parser.add_argument("--seed", type=int, default=0, help="of the rotation")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="the twin's storage dtype")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows of evaluation text for the KLD")
    args = parser.parse_args(argv)
    from ewq.backends import hf
    from ewq.data import wiki
    from ewq.errors import UserError

    source = args.model or Path(assets.default_model())
    target = args.out_dir or ROOT / ".cache" / f"rotated-twin-{args.seed}"
    try:
        write_twin(source, target, args.seed, getattr(torch, args.dtype))
    except (ValueError, KeyError) as error:
        raise UserError(f"cannot rotate {source}: {error}") from None
    ids = hf.load_tokenizer(str(source)).encode(wiki.eval_text(assets.wiki_file()), add_special_tokens=False)
    windows = torch.tensor(ids[: args.windows * 512]).reshape(-1, 512)
    mean, worst = kld_to_source(source, target, windows)
    print(f"twin {target} ({args.dtype}, seed {args.seed})")
    print(f"KLD(source || twin) per token: mean {mean:.2e} over {len(windows)} windows of 512, worst window {worst:.2e}")
    print(f"matrices per grid: source {grids(Path(source))}, twin {grids(target)}")


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
