"""GGUF files: convert an HF model to F16, build an importance matrix, quantize, read back, verify.

The read-back uses the `gguf` package's reader: the types, sizes and bits per weight written in
every result come from the file itself, not from what was asked of llama-quantize. A llama.cpp
tool that fails is a ToolError: one line naming the step and the tool's last line of output.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..console import log
from ..errors import ToolError, UserError
from ..results.io import atomic_path
from ..results.record import WeightsReport
from . import build as tools


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str
    n_elements: int
    n_bytes: int


def read_tensors(path: Path) -> list[GGUFTensor]:
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic)")
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError) as error:
        raise UserError(f"cannot read GGUF {path}: {error}") from None
    return [GGUFTensor(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]


def describe(path: Path) -> WeightsReport:
    """Tensor bytes, bits per weight over all tensors, file size and the type histogram, read from the file."""
    tensors = read_tensors(path)
    histogram = collections.Counter(t.type_name for t in tensors)
    return WeightsReport(weight_bytes=sum(t.n_bytes for t in tensors), n_weights=sum(t.n_elements for t in tensors),
                         details={"file": str(path), "file_bytes": Path(path).stat().st_size,
                                  "type_histogram": dict(sorted(histogram.items()))})


def verify_plan(plan, path: Path) -> dict:
    """Every planned tensor's type in the file equals the plan's; a mismatch is an error naming them."""
    in_file = {t.name: t.type_name for t in read_tensors(path)}
    mismatches, missing = [], []
    for entry in plan.tensors:
        if not entry.gguf_name:
            if entry.is_matrix:
                missing.append(f"{entry.hf_name} (no GGUF name)")
            continue
        if entry.gguf_name not in in_file:
            missing.append(entry.gguf_name)
        elif in_file[entry.gguf_name] != entry.llama_type:
            mismatches.append(f"{entry.gguf_name}: plan {entry.llama_type}, file {in_file[entry.gguf_name]}")
    if mismatches or missing:
        raise UserError(f"{path} does not follow plan {plan.plan_hash}: "
                        + "; ".join(mismatches + [f"{name}: missing" for name in missing]))
    return {"plan_hash": plan.plan_hash, "tensors_checked": sum(1 for e in plan.tensors if e.gguf_name),
            "matches_plan": True}


def run_tool(command: list, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; its failure is a ToolError (one line: the step, the exit code, the
    tool's last line of output)."""
    log(f"{what}: {' '.join(map(str, command[:3]))} ...")
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ToolError(f"{what} failed (exit {result.returncode}): {lines[-1].strip() if lines else 'no output'}")
    return result


def convert_f16(model_dir: Path, target: Path) -> Path:
    """HF directory -> F16 GGUF with the vendored convert_hf_to_gguf.py (it brings its own gguf-py)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temp:
        run_tool([sys.executable, tools.converter(), model_dir, "--outtype", "f16", "--outfile", temp],
             "convert to F16 GGUF")
    return target


def build_imatrix(f16: Path, calibration_text: Path, target: Path, context: int, chunks: int) -> Path:
    if target.is_file():
        return target
    with atomic_path(target) as temp:
        run_tool([tools.tool("llama-imatrix"), "-m", f16, "-f", calibration_text, "-o", temp,
               "--output-format", "gguf", "-c", context, "--chunks", chunks, "--no-ppl"], "importance matrix")
    return target


def quantize(f16: Path, target: Path, ftype: str, imatrix: Path | None) -> Path:
    if target.is_file():
        return target
    with atomic_path(target) as temp:
        extra = ["--imatrix", imatrix] if imatrix else []
        run_tool([tools.tool("llama-quantize"), *extra, f16, temp, ftype], f"quantize {ftype}")
    return target


def quantize_with_plan(script: Path, f16: Path, target: Path, imatrix: Path | None) -> Path:
    """Run the plan's quantize_command_<hash>.sh with our llama-quantize."""
    if target.is_file():
        return target
    with atomic_path(target) as temp:
        env = {**os.environ, "LLAMA_QUANTIZE": str(tools.tool("llama-quantize"))}
        extra = ["--imatrix", imatrix] if imatrix else []
        run_tool(["bash", script, f16, temp, *extra], "quantize with the EWQ plan", env=env)
    return target


def llama_perplexity(gguf: Path, text_file: Path, context: int, chunks: int, threads: int,
                     kld_base: Path, write_base: bool) -> dict:
    """llama.cpp's own perplexity (and KLD against a stored base) on a text file, parsed: the
    independent measurement our figures are checked against."""
    command = [tools.tool("llama-perplexity"), "-m", gguf, "-f", text_file, "-c", context,
               "--chunks", chunks, "-t", threads, "--kl-divergence-base", kld_base]
    if not write_base:
        command.append("--kl-divergence")
    result = run_tool(command, "llama-perplexity")
    text = result.stdout + result.stderr
    number = r"([-+0-9.eE]+)"
    parsed: dict = {}
    for key, pattern in {"ppl": rf"Mean PPL\(Q\)\s*:\s*{number}\s*±\s*{number}",
                         "kld": rf"Mean\s+KLD:\s*{number}\s*±\s*{number}",
                         "same_top1_pct": rf"Same top p:\s*{number}\s*±\s*{number}"}.items():
        match = re.search(pattern, text)
        if match:
            parsed[key] = {"mean": float(match.group(1)), "se": float(match.group(2))}
    if "ppl" not in parsed:  # writing the base prints the classic estimate only
        match = re.search(rf"Final estimate: PPL = {number} \+/- {number}", text)
        if match:
            parsed["ppl"] = {"mean": float(match.group(1)), "se": float(match.group(2))}
    return parsed
