"""The rotated twin of a model (ewq.twin) checked: its KLD to the source, the grids of its matrices (printed).

    python -m benchmarks.rotated_twin [--model DIR] [--out-dir .cache/rotated-twin-<seed>] [--seed 0]
                                      [--dtype bfloat16] [--windows 8]

prints the twin's KLD to the source on evaluation-role windows (ewq.metrics.kld, both in float32
compute), and which grid each matrix of the source and of the twin lies on.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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
    from ewq.twin import write_twin

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
