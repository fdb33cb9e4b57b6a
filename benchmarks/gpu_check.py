"""One GPU check, ready to run (issue 23): the benchmarks' GPU paths against their CPU paths, and a 1B-class model's
rates on the GPU, printed; exit 1 if a figure is outside its tolerance.

    python -m benchmarks.gpu_check [--device cuda] [--parts agreement,scale] [--out-dir DIR] [--json OUT]

Run it on a GPU host after `bash scripts/setup.sh`, which builds llama.cpp with CUDA for the present GPU's
architecture only when nvcc and a GPU are found (EWQ_CUDA=1 forces it; the llama.cpp row fails without it).
Aimed at 8 minutes on one GPU with the build already done; a fresh build adds its own minutes.

1. agreement: a tiny random Llama (2 layers, hidden 64, SmolLM2's tokenizer; weights drawn with std 0.2 so its
   next-token distributions are far from uniform) through the benchmark scripts themselves, --quick, the same
   settings once with --device cpu and once with --device DEVICE, each device into its own results folders:
   the original in float32, bfloat16 and float16; its entropy plan through bitsandbytes (int8 and nf4 modules)
   and llama.cpp's Q8_0, both against the float32 original of their device. Per variant, DEVICE against CPU:
   every window scored on both, the largest relative difference of a window's mean NLL, the MMLU questions
   scored differently, the greedy generations that differ, the mean KLD to the original (variants), and that
   the DEVICE run recorded its GPU memory. Tolerances per arithmetic (TOLERANCES): float32 is the same
   arithmetic in another order; bf16/fp16 round every product; bitsandbytes' and llama.cpp's GPU kernels round
   activations differently from their CPU kernels.
2. scale: a synthetic ~1B bf16 Llama (benchmarks.synthetic) on DEVICE in its checkpoint's dtype (float32 on the
   CPU): MMLU questions/s at batch 1 against the batched path (the benchmarks' HFBackend both ways, answers
   compared), the bitsandbytes load's peak GPU memory against its read-back weight bytes (the default entropy
   plan), and the kld measurement's seconds per tensor (SensitivityService, one tensor at a time on 2 x 512
   calibration tokens, its host round trip included).
With --device cpu both sides are the CPU and the 1B is replaced by a small model: how the tests run it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("agreement", "scale")


class ScriptFailed(RuntimeError):
    """One of the project's scripts that the check runs exited non-zero."""


@dataclass(frozen=True)
class Tolerance:
    nll: float  # largest relative difference of one window's mean NLL
    mmlu: float  # share of MMLU questions that may be scored differently
    kld: float | None = None  # relative difference of the mean KLD to the original (variants only)


TOLERANCES = {"float32": Tolerance(1e-4, 0.02), "half": Tolerance(2e-2, 0.10),
              "bitsandbytes": Tolerance(2e-2, 0.10, 0.5), "llama.cpp": Tolerance(1e-2, 0.05, 0.5)}


@dataclass(frozen=True)
class Run:
    """One benchmark script run per device: `folder` the results folder under each device's own (an original
    writes the reference the variants of its folder read)."""
    label: str
    script: str
    args: tuple[str, ...]
    folder: str
    arithmetic: str


def agreement_runs(model: Path, plans: Path, ggufs: Path) -> list[Run]:
    common = ("--model", str(model), "--quick")
    originals = [Run(f"original {dtype}", "benchmark_original.py", (*common, "--dtype", dtype), dtype,
                     "float32" if dtype == "float32" else "half") for dtype in ("float32", "bfloat16", "float16")]
    return originals + [
        Run("bitsandbytes plan", "benchmark_ewq.py", (*common, "--plans-dir", str(plans)), "float32", "bitsandbytes"),
        Run("llama.cpp Q8_0", "benchmark_gguf_q8.py", (*common, "--gguf-dir", str(ggufs)), "float32", "llama.cpp")]


def run_script(script: str, *args: str) -> Path:
    """Run one of the project's scripts; the path it prints first (its result or plan)."""
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ScriptFailed(f"{script} {' '.join(args)} failed (exit {result.returncode}):\n{tail}")
    return Path(result.stdout.split()[0])


def compare(cpu: dict, device: dict, tolerance: Tolerance, gpu: bool) -> dict:
    """One row: the DEVICE result against the CPU result of the same run, each figure beside its tolerance;
    `failures` names what is outside one."""
    ppl_cpu, ppl_dev = cpu["metrics"]["perplexity"], device["metrics"]["perplexity"]
    nll_cpu, nll_dev = ppl_cpu["per_window_nll"], ppl_dev["per_window_nll"]
    row = {"windows": f"{len(nll_dev)} / {len(nll_cpu)}", "failures": []}
    if len(nll_cpu) != len(nll_dev) or ppl_dev["ppl"]["n_windows"] != len(nll_dev):
        row["failures"].append("windows")
    pairs = list(zip(nll_cpu, nll_dev))
    row["nll_rel"] = max(abs(d - c) / abs(c) for c, d in pairs) if pairs else float("nan")
    if not row["nll_rel"] <= tolerance.nll:
        row["failures"].append("nll")
    correct_cpu, correct_dev = (r["metrics"]["mmlu"]["per_question_correct"] for r in (cpu, device))
    differ = sum(a != b for a, b in zip(correct_cpu, correct_dev))
    row["mmlu_differ"] = f"{differ} / {len(correct_cpu)}"
    if len(correct_cpu) != len(correct_dev) or differ > tolerance.mmlu * len(correct_cpu):
        row["failures"].append("mmlu")
    texts_cpu, texts_dev = ([o["text"] for o in r["metrics"]["generation"]["outputs"]] for r in (cpu, device))
    row["generations_differ"] = f"{sum(a != b for a, b in zip(texts_cpu, texts_dev))} / {len(texts_cpu)}"
    if tolerance.kld is not None:
        kld_cpu, kld_dev = ppl_cpu["kld"]["mean"], ppl_dev["kld"]["mean"]
        row["kld"] = f"{kld_dev:.3g} vs {kld_cpu:.3g}"
        if not abs(kld_dev - kld_cpu) <= tolerance.kld * kld_cpu + 3 * (ppl_cpu["kld"]["se"] + ppl_dev["kld"]["se"]):
            row["failures"].append("kld")
    if gpu:
        memory = device["metrics"].get("memory_peak", {})
        used = memory.get("nvml_run_peak_bytes") or memory.get("torch_peak_allocated_bytes")
        row["gpu_memory"] = used
        if not used:
            row["failures"].append("gpu memory")
    return row


def tiny_model(path: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (llama.cpp converts it), std 0.2 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ewq import assets

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for source in Path(assets.default_model()).iterdir():
        if source.name.startswith("tokenizer") or source.suffix == ".jinja":
            shutil.copy(source, path / source.name)
    return path


def agreement(device: str, work: Path) -> list[dict]:
    model = tiny_model(work / "tiny")
    plans, ggufs = work / "plans", work / "gguf"
    run_script("create_quantization_plan.py", "--model", str(model), "--out-dir", str(plans))
    rows = []
    for run in agreement_runs(model, plans, ggufs):
        results = {}
        for side in ("cpu", device):
            started = time.perf_counter()
            out = work / f"results-{side}" / run.folder
            path = run_script(run.script, *run.args, "--device", side, "--out-dir", str(out))
            results[side] = json.loads(path.read_text())
            print(f"  {run.label} on {side}: {time.perf_counter() - started:.0f} s", flush=True)
        rows.append({"variant": run.label, "arithmetic": run.arithmetic,
                     **compare(results["cpu"], results[device], TOLERANCES[run.arithmetic], device != "cpu")})
    return rows


def scale(device: str, work: Path) -> dict:
    import torch

    from benchmarks.mmlu_cost import after
    from benchmarks.synthetic import llama_config, write_checkpoint
    from ewq import assets
    from ewq.backends import hf
    from ewq.bench.inputs import mmlu_inputs
    from ewq.bench.settings import FULL, EvalSettings
    from ewq.metrics.mmlu import letter_token_ids

    gpu = device != "cpu"
    config = llama_config(14, 2048, 8192) if gpu else llama_config(2, 256, 512)
    model_dir = write_checkpoint(work / "synthetic", config)
    assets.copy_default_tokenizer(model_dir)
    figures = {"model": f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}"}
    tokenizer = hf.load_tokenizer(model_dir)
    _, prompts = mmlu_inputs(tokenizer, EvalSettings(device=device, **dict(FULL, mmlu_per_subject=4 if gpu else 1)))
    letters = letter_token_ids(tokenizer)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = hf.load_model(model_dir, device, dtype)
    report = hf.dense_weights_report(model)
    answers = {}
    for label, batch in (("batch 1", 1), ("batched", None)):
        backend = hf.HFBackend(model, device, label, report, batch_size=batch)
        started = time.perf_counter()
        answers[label] = after(backend, prompts, letters)
        figures[f"mmlu q/s {label}"] = len(prompts) / (time.perf_counter() - started)
    figures["mmlu answers differ"] = f"{int((answers['batch 1'].argmax(1) != answers['batched'].argmax(1)).sum())} " \
                                     f"/ {len(prompts)}"
    figures["kld s/tensor"] = kld_seconds_per_tensor(model, tokenizer, config)
    del model
    figures.update(bnb_memory(model_dir, work / "plans-1b", device))
    return figures


def kld_seconds_per_tensor(model, tokenizer, config: dict) -> dict[str, float]:
    """Seconds of one sensitivity measurement (round trip to Q4_K on the host, the windows, the KLD) for a few
    tensors across the model, after the service's unperturbed pass."""
    from ewq.plan.entries import TensorEntry
    from ewq.quant_types import LlamaType
    from ewq.sensitivity.cached import CalibrationSpec, calibration_tokens
    from ewq.sensitivity.service import SensitivityService

    last = config["num_hidden_layers"] - 1
    names = {"model.layers.0.self_attn.q_proj.weight": 0, f"model.layers.{last}.mlp.down_proj.weight": last,
             "lm_head.weight": None}
    service = SensitivityService(model, calibration_tokens(tokenizer, CalibrationSpec(2, 512)), None)
    seconds = {}
    for name, block in names.items():
        shape = list(model.get_parameter(name).shape)
        entry = TensorEntry(name, None, block, shape, "bfloat16", shape[0] * shape[1], 0.0, 0.0, 0.0, 0.0)
        started = time.perf_counter()
        service.measure([(entry, LlamaType.Q4_K)])
        seconds[name] = time.perf_counter() - started
    return seconds


def bnb_memory(model_dir: Path, plans: Path, device: str) -> dict:
    import torch

    from ewq import bnb_model, weights
    from ewq.metrics import memory
    from ewq.plan.files import load_plan

    plan = load_plan(run_script("create_quantization_plan.py", "--model", str(model_dir), "--out-dir", str(plans)))
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    model, not_applicable = bnb_model.load_quantized(weights.open_model(str(model_dir)), plan, device, torch.float16
                                                     if device != "cpu" else torch.float32)
    weight_bytes = bnb_model.read_back(model, plan, not_applicable).weight_bytes
    peak = memory.gpu_snapshot().get("torch_peak_allocated_bytes") if device != "cpu" else None
    return {"bnb read-back weight bytes": weight_bytes, "bnb peak GPU allocated bytes": peak}


def main(argv=None) -> None:
    from ewq.commands.common import Parser
    from ewq.errors import UserError

    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="the device checked against the CPU (cpu: both sides the CPU, a small model for scale)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--out-dir", type=Path, help="keep the models and results here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"--parts: unknown part {', '.join(sorted(set(parts) - set(PARTS)))}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    try:
        figures = check(args.device, parts, args.out_dir, args.json)
    except ScriptFailed as error:  # its last lines, exit 1
        print(f"gpu check: {error}", file=sys.stderr)
        sys.exit(1)
    if any(row["failures"] for row in figures.get("agreement", [])):
        sys.exit(1)


def check(device: str, parts: list[str], out_dir: Path | None, json_out: Path | None) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = out_dir or Path(tmp)
        figures = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                   "cores": os.cpu_count()}
        started = time.perf_counter()
        if "agreement" in parts:
            figures["agreement"] = agreement(device, work / "agreement")
            for row in figures["agreement"]:
                verdict = "ok" if not row["failures"] else "FAIL: " + ", ".join(row["failures"])
                print(f"{row['variant']:20s} windows {row['windows']:7s} NLL rel. {row['nll_rel']:.1e} "
                      f"(tol. {TOLERANCES[row['arithmetic']].nll:.0e}), MMLU differ {row['mmlu_differ']}, generations "
                      f"differ {row['generations_differ']}, KLD {row.get('kld', '-')}, GPU memory "
                      f"{row.get('gpu_memory', '-')}: {verdict}")
        if "scale" in parts:
            figures["scale"] = scale(device, work / "scale")
            for key, value in figures["scale"].items():
                print(f"{key}: {value}")
        figures["seconds"] = time.perf_counter() - started
        figures["tolerances"] = {name: asdict(t) for name, t in TOLERANCES.items()}
        print(f"{figures['seconds']:.0f} s on {figures['device']}")
        if json_out:
            from ewq.fileio import write_json_atomic

            write_json_atomic(json_out, figures)
    return figures


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
