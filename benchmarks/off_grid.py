"""Issue 10's comparison at Q4_K_M's size on a model whose weights lie on no quantization grid (printed).

The default model was dequantized from a GGUF: its layers' matrices lie on Q4_1's grid (a scale and
an offset per 32 weights) and its embedding on Q8_0's, which those types reproduce almost exactly,
an advantage that no model trained in bf16 gives a type. Here every weight is moved off its grid by
Gaussian noise of 0.4 of its row's mean grid step (Q4_1: (max - min) / 15, Q8_0: absmax / 127, per 32
weights), one scale per row so that the noise keeps no block structure: quantizing it to that type
again then costs about a quarter of a step per weight, as for a trained model, where the shipped
weights cost nothing. A stand-in, not a trained model: its F16 file is the reference of
every KLD below, and how far the noise moved it from the default model is printed too.

Then, as the issue asks: one importance matrix (calibration-role text), llama.cpp's Q4_K_M (or each preset
of --presets), and at its tensor bytes the plans by kld (in llama.cpp's CPU arithmetic, by the weights' error alone,
with a correction round over bands of 5 layers, and measured on 8 calibration windows instead of 2), error,
pr15550 and entropy (--variants: some of them), each file measured by llama-perplexity --kl-divergence
against the F16 file on evaluation-role text the calibration never saw, with llama-perplexity's SE (every
token independent), the SE across chunks (which text was read) and the ratio to the preset paired over
chunks; then each kld plan's predicted KLD against what it measures in the HF model and in llama.cpp, on
--prediction-chunks of calibration and of evaluation text.

    python -m benchmarks.off_grid [--stand-in noise|twin] [--source default|qwen] [--out-dir DIR] [--seed 0]
                                  [--chunks 24] [--prediction-chunks 128] [--allocator optimized|ranked] [--variants kld,error,...]
                                  [--presets Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K]

--source qwen takes the twin of the second architecture, Qwen2.5-Coder-0.5B-Instruct (`python -m
ewq.commands.setup qwen` fetches it); its GGUF was Q4_K_M, on no grid the noise stand-in knows.

Files are kept in --out-dir; a second run measures again from them (about 25 minutes on 2 cores the
first time, most of it the kld plan's sensitivities).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32  # weights per block of Q4_1 and Q8_0, along a row
NOISE_STEPS = 0.4  # the noise's standard deviation, in grid steps of its row
# The prediction is checked on more text than the file table reads: over 24 chunks the twin's Q4_K_M cost 1.29x
# more on evaluation than on calibration text, over 128 chunks 1.09x (docs/results.md): which 24 chunks were read
# moves a file's KLD by more than llama-perplexity's per-token SE says
PREDICTION_CHUNKS = 128
CORRECTION_BAND = 5  # of the kld plan with a correction round: each tensor kind over bands of 5 layers
# label -> (score, further plan arguments): the plans made at a preset's tensor bytes
VARIANTS = {"kld": ("kld", ()), "kld weights": ("kld", ("--kld-arithmetic", "weights")),
            "kld corr.": ("kld", ("--correction-band", str(CORRECTION_BAND))),
            "kld 8w": ("kld", ("--calibration-windows", "8")),
            "error": ("error", ()), "pr15550": ("pr15550", ()), "entropy": ("entropy", ())}


def comma_list(allowed: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names among `allowed` (an unknown one is an argparse error that
    names it)."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)}: not among {', '.join(allowed)}")
        return names
    return parse


PRESETS = ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")  # llama.cpp's mixes whose sizes the plans are made at
variant_list, preset_list = comma_list(VARIANTS), comma_list(PRESETS)  # --variants, --presets


def grid_step(matrix: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(type, step [blocks, 1]) of the grid the matrix's values lie on, per block of 32 along its rows:
    Q4_1 (offset + step * 0..15) or Q8_0 (step * -127..127); a ValueError if on neither."""
    blocks = matrix.float().reshape(-1, BLOCK)
    low, high = blocks.aminmax(dim=1, keepdim=True)
    for name, offset, step in (("Q4_1", low, (high - low) / 15),
                               ("Q8_0", 0.0, blocks.abs().amax(dim=1, keepdim=True) / 127)):
        levels = (blocks - offset) / step.clamp_min(1e-12)
        if (levels - levels.round()).abs().mean() < 0.02:  # fp16 storage leaves ~0.001 of a step
            return name, step
    raise ValueError("the values lie on neither Q4_1's nor Q8_0's grid")


def off_grid(matrix: torch.Tensor, generator: torch.Generator) -> tuple[str, torch.Tensor]:
    """The matrix with Gaussian noise added, its standard deviation NOISE_STEPS of its row's mean grid step,
    one figure per row: no trace of the source's 32-weight blocks in the noise, and wide enough that a
    weight's place between the source grid's levels is near uniform (the first Fourier coefficient of that
    place is exp(-2 pi^2 NOISE_STEPS^2), 0.04). (grid type, result)."""
    name, step = grid_step(matrix)
    row_step = step.reshape(matrix.shape[0], -1).mean(dim=1, keepdim=True)  # [rows, 1]
    noise = torch.randn(matrix.shape, generator=generator) * (NOISE_STEPS * row_step)
    return name, (matrix.float() + noise).to(matrix.dtype)


def write_off_grid_model(source: Path, target: Path, seed: int) -> dict[str, int]:
    """Copy of the model directory with every matrix off its grid; how many matrices per grid type."""
    from safetensors.torch import load_file, save_file

    from ewq.fileio import atomic_path

    if (target / "model.safetensors").is_file():
        return {}
    generator, grids = torch.Generator().manual_seed(seed), {}
    tensors = load_file(source / "model.safetensors")
    for name, tensor in tensors.items():
        if tensor.dim() == 2:
            grid, tensors[name] = off_grid(tensor, generator)
            grids[grid] = grids.get(grid, 0) + 1
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, target / item.name)
    with atomic_path(target / "model.safetensors") as temp:
        save_file(tensors, str(temp), metadata={"format": "pt"})
    return grids


def plan_file(model: Path, target_size: Path, score: str, imatrix: Path, out_dir: Path, f16: Path,
              allocator: str = "optimized", extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The issue's command for one score (and `extra` arguments), then the plan's quantize script: (the
    plan file, the planned GGUF)."""
    from ewq.processes import run_tool
    from ewq.llamacpp import tools as llama_tools

    command = [sys.executable, str(ROOT / "create_quantization_plan.py"), "--model", model, "--target-size",
               target_size, "--score", score, "--no-keep-embeddings", "--no-keep-lm-head", "--out-dir", out_dir,
               "--allocator", allocator, *extra]
    command += ["--imatrix", imatrix] if score in ("kld", "error", "pr15550") or allocator == "optimized" else []
    plan, script = run_tool(command, f"the {score} plan").stdout.split()[:2]
    out = out_dir / f"{Path(plan).stem.removeprefix('quant_plan_')}-{score}-{allocator}.gguf"
    return Path(plan), llama_tools.quantize_with_plan(Path(script), f16, out, imatrix)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stand-in", choices=("noise", "twin"), default="noise",
                        help="noise: every weight moved by Gaussian noise of 0.4 of its row's grid step; twin: the function-"
                             "preserving rotated twin (ewq.twin, bf16)")
    parser.add_argument("--source", choices=("default", "qwen"), default="default",
                        help="the model the stand-in is made from: the default model, or Qwen2.5-Coder-0.5B-Instruct "
                             "(twin only)")
    parser.add_argument("--out-dir", type=Path, help="where the stand-in model and its files are kept "
                        "(default: .cache/off-grid-[qwen-]noise-<seed>, .cache/off-grid-[qwen-]twin-<seed>)")
    parser.add_argument("--seed", type=int, default=0, help="of the noise, or of the twin's rotation")
    parser.add_argument("--chunks", type=int, default=24, help="512-token chunks of evaluation text of the file table")
    parser.add_argument("--prediction-chunks", type=int, default=PREDICTION_CHUNKS,
                        help="512-token chunks of calibration and of evaluation text on which each kld plan's "
                             f"prediction is checked (default {PREDICTION_CHUNKS})")
    parser.add_argument("--allocator", choices=("optimized", "ranked"), default="optimized",
                        help="of the error and entropy plans (the kld plan is always optimized)")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        help=f"the plans to make and measure beside each preset, comma-separated (default: all of "
                             f"{','.join(VARIANTS)})")
    parser.add_argument("--presets", type=preset_list, default=["Q4_K_M"],
                        help=f"llama.cpp's presets at whose tensor bytes the plans are made, comma-separated "
                             f"(default: Q4_K_M; all: {','.join(PRESETS)})")
    args = parser.parse_args(argv)
    if min(args.chunks, args.prediction_chunks) < 2:
        parser.error("--chunks and --prediction-chunks need 2 chunks at least: the SEs are across chunks")
    if args.source == "qwen" and args.stand_in == "noise":
        parser.error("--source qwen has the twin stand-in only: the noise is sized by Q4_1's and Q8_0's grids, "
                     "and its GGUF was Q4_K_M")
    name = "off-grid-" + ("qwen-" if args.source == "qwen" else "") + args.stand_in
    args.out_dir = args.out_dir or ROOT / ".cache" / f"{name}-{args.seed}"

    from ewq import assets
    from ewq.llamacpp.tools import IMATRIX_CHUNKS, IMATRIX_CONTEXT, calibration_file
    from ewq.data import wiki
    from ewq.llamacpp import gguf_read
    from ewq.llamacpp import tools as llama_tools
    from ewq.fileio import write_text_atomic
    from ewq.metrics import stats

    out, threads, context = args.out_dir, torch.get_num_threads(), 512
    model = out / "model"
    source = assets.prepare_qwen_model() if args.source == "qwen" else Path(assets.default_model())
    if args.stand_in == "twin":
        from ewq.twin import write_twin

        write_twin(source, model, args.seed, torch.bfloat16)
    else:
        grids = write_off_grid_model(source, model, args.seed)
        if grids:
            print(f"off-grid model written: matrices per grid {grids}")
    f16 = llama_tools.convert_f16(model, out / "F16.gguf")
    imatrix = llama_tools.build_imatrix(f16, calibration_file(out), out / "imatrix.gguf", IMATRIX_CONTEXT,
                                       IMATRIX_CHUNKS)
    files, plans = {}, {}  # (preset, label) -> the GGUF file / the plan; label = the preset's name for its own file
    for preset in args.presets:
        files[preset, preset] = preset_file = llama_tools.quantize(f16, out / f"{preset}-imat.gguf", preset, imatrix)
        for label in args.variants:
            score, extra = VARIANTS[label]
            plans[preset, label], files[preset, label] = plan_file(
                model, preset_file, score, imatrix, out, f16,
                "optimized" if score in ("kld", "pr15550") else args.allocator, extra)

    text = out / "eval.txt"
    if not text.is_file():
        write_text_atomic(text, wiki.eval_text(assets.wiki_file()))
    base = out / f"F16-{args.chunks}.kld-base"

    def measure(gguf: Path, write_base: bool = False, against: Path = base, on: Path = text,
                chunks: int = args.chunks) -> dict:
        return llama_tools.llama_perplexity(gguf, on, context, chunks, threads, against, write_base)

    def figure(value: dict | None) -> str:
        return f"{value['mean']:.5f} ± {value['se']:.5f}" if value else "-"

    def across_chunks(measured: dict) -> "stats.Estimate":
        """The KLD's mean over chunks with its SE across chunks."""
        return stats.mean_se(measured["kld_per_chunk"])

    def to_preset(measured: dict, preset_measured: dict) -> str:
        """The KLD's ratio to its preset's, paired over the chunks both read."""
        ratio = stats.paired_ratio(measured["kld_per_chunk"], preset_measured["kld_per_chunk"])
        return f"{ratio.mean:.3f} ± {ratio.se:.3f}"

    print(f"evaluation text: {args.chunks} x {context} tokens (llama-perplexity: scored second half of each chunk)")
    f16_ppl = measure(f16, write_base=True)["ppl"]
    print(f"off-grid F16: PPL {figure(f16_ppl)}")
    # how far the stand-in moved from its source (the twin: rounding to bf16 only), the source's F16 as the base
    source_f16, source_base = llama_tools.convert_f16(source, out / "source-F16.gguf"), out / "source-F16.kld-base"
    source_ppl = measure(source_f16, write_base=True, against=source_base)["ppl"]
    moved = measure(f16, against=source_base)
    print(f"source F16 ({source.name}): PPL {figure(source_ppl)}; off-grid F16 against it: KLD "
          f"{figure(moved.get('kld'))}")
    print("KLD ± llama-perplexity's SE (every token independent), ± the SE across chunks; the ratio to the preset "
          "paired over chunks")
    print(f"{'size of':8} {'file':10} {'tensor bytes':>12} {'bpw':>6} {'KLD vs its F16':>22} {'± chunks':>9} "
          f"{'/ preset':>15} {'KLD p99':>9} {'same top-1 %':>16} {'RMS Δp %':>16} {'PPL ratio':>18}")
    measured_files = {}
    for (preset, label), path in files.items():
        measured_files[preset, label] = measured = measure(path)
        weights_read = gguf_read.describe(path)
        p99 = measured.get("kld_p99")
        print(f"{preset if label == preset else '':8} {label:10} {weights_read.weight_bytes:>12,} {weights_read.bits_per_weight:>6.3f} "
              f"{figure(measured.get('kld')):>22} {across_chunks(measured).se:>9.5f} "
              f"{to_preset(measured, measured_files[preset, preset]):>15} {p99['mean'] if p99 else float('nan'):>9.5f} "
              f"{figure(measured.get('same_top1_pct')):>16} {figure(measured.get('rms_dp_pct')):>16} "
              f"{figure(measured.get('ppl_ratio')):>18}")


    # item 3 of the issue: each kld plan's predicted KLD (calibration windows, sum over tensors) against its
    # whole-plan measurements: in the HF model on those windows, and by llama-perplexity on calibration text
    # (the importance matrix's, whose first windows the sensitivities were measured on) and on evaluation text,
    # --prediction-chunks of each; measured / predicted ± the SE across chunks over the prediction
    chunks = args.prediction_chunks
    calibration = calibration_file(out)
    calibration_base, evaluation_base = out / f"F16-calibration-{chunks}.kld-base", out / f"F16-{chunks}.kld-base"
    for written, on in ((calibration_base, calibration), (evaluation_base, text)):
        if not written.is_file():  # kept with the F16 file it was written from
            measure(f16, write_base=True, against=written, on=on, chunks=chunks)

    def against_prediction(measured: dict, predicted: float) -> str:
        return (f"{measured['kld']['mean']:>9.5f} ({measured['kld']['mean'] / predicted:.2f} ± "
                f"{across_chunks(measured).se / predicted:.2f})")

    measured_long = {}  # (preset, label) -> on evaluation text, over the prediction's chunks
    print(f"{'size of':8} {'kld plan':12} {'predicted':>9} {'HF, calibration':>15} {'llama.cpp, calibration':>24} "
          f"{'llama.cpp, evaluation':>24}   (measured / predicted; llama.cpp on {chunks} x {context} tokens of each)")
    for preset, label in [key for key in plans if VARIANTS[key[1]][0] == "kld"]:
        from ewq.plan.files import load_plan

        gguf_budget = load_plan(plans[preset, label]).budget.gguf
        predicted = gguf_budget.predicted_kld
        on_calibration = measure(files[preset, label], against=calibration_base, on=calibration, chunks=chunks)
        on_evaluation = measured_long[preset, label] = measure(files[preset, label], against=evaluation_base,
                                                               chunks=chunks)
        print(f"{preset:8} {label:12} {predicted:>9.5f} {gguf_budget.measured_kld_calibration:>9.5f} "
              f"({gguf_budget.measured_kld_calibration / predicted:.2f}) {against_prediction(on_calibration, predicted):>24} "
              f"{against_prediction(on_evaluation, predicted):>24}")
        if gguf_budget.first_predicted_kld is not None:
            print(f"{'':21} its first allocation: {gguf_budget.first_predicted_kld:.5f} predicted, "
                  f"{gguf_budget.first_measured_kld_calibration:.5f} measured in the HF model on calibration windows "
                  f"({gguf_budget.first_measured_kld_calibration / gguf_budget.first_predicted_kld:.2f})")
    for preset in args.presets:
        on_calibration = measure(files[preset, preset], against=calibration_base, on=calibration, chunks=chunks)
        on_evaluation = measure(files[preset, preset], against=evaluation_base, chunks=chunks)
        print(f"{preset} over {chunks} chunks: calibration text {figure(across_chunks(on_calibration).to_json())}, evaluation text "
              f"{figure(across_chunks(on_evaluation).to_json())} (± across chunks)")
        for (plan_preset, label), measured in measured_long.items():
            if plan_preset == preset:
                print(f"  {label}: {to_preset(measured, on_evaluation)} of {preset}'s KLD on these {chunks} chunks of "
                      f"evaluation text (paired over chunks)")


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
