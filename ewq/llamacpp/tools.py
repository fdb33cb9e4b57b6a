"""llama.cpp's tools at work on files: convert an HF model to F16, build an importance matrix,
quantize (a preset, or a plan's script), and measure (llama-perplexity, llama-bench).

Each writes its file atomically and keeps one already there (the caller names files by what they
hold). A tool that fails is a ToolError (processes.run_tool): one line naming the step and the
tool's last line.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .. import assets
from ..data import wiki
from ..fileio import atomic_path, write_text_atomic
from ..processes import run_tool
from . import toolchain

# the importance matrix of every quantized file: chunks of calibration-role text (never evaluation text)
IMATRIX_CONTEXT, IMATRIX_CHUNKS = 512, 100
BENCH_PROMPT, BENCH_GEN = 512, 128  # llama-bench's default pp512 / tg128


def convert_f16(model_dir: Path, target: Path) -> Path:
    """HF directory -> F16 GGUF with the vendored convert_hf_to_gguf.py (it brings its own gguf-py)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temp:
        run_tool([sys.executable, toolchain.converter(), model_dir, "--outtype", "f16", "--outfile", temp],
             "convert to F16 GGUF")
    return target


def build_imatrix(f16: Path, calibration_text: Path, target: Path, context: int, chunks: int) -> Path:
    if target.is_file():
        return target
    with atomic_path(target) as temp:
        run_tool([toolchain.tool("llama-imatrix"), "-m", f16, "-f", calibration_text, "-o", temp,
               "--output-format", "gguf", "-c", context, "--chunks", chunks, "--no-ppl"], "importance matrix")
    return target


def quantize(f16: Path, target: Path, ftype: str, imatrix: Path | None) -> Path:
    if target.is_file():
        return target
    with atomic_path(target) as temp:
        extra = ["--imatrix", imatrix] if imatrix else []
        run_tool([toolchain.tool("llama-quantize"), *extra, f16, temp, ftype], f"quantize {ftype}")
    return target


def quantize_with_plan(script: Path, f16: Path, target: Path, imatrix: Path | None) -> Path:
    """Run the plan's quantize_command_<hash>.sh with our llama-quantize."""
    if target.is_file():
        return target
    with atomic_path(target) as temp:
        env = {**os.environ, "LLAMA_QUANTIZE": str(toolchain.tool("llama-quantize"))}
        extra = ["--imatrix", imatrix] if imatrix else []
        run_tool(["bash", script, f16, temp, *extra], "quantize with the EWQ plan", env=env)
    return target


def llama_perplexity(gguf: Path, text_file: Path, context: int, chunks: int, threads: int,
                     kld_base: Path, write_base: bool) -> dict:
    """llama.cpp's own perplexity (and KLD against a stored base) on a text file, parsed: the
    independent measurement our figures are checked against. Against a base, also the figures a
    quant table reports: the KLD's 99th percentile and maximum, same top-p, RMS Δp, the PPL ratio
    (each {"mean", "se"}; percentiles and maximum a bare "mean", llama-perplexity gives no SE)."""
    command = [toolchain.tool("llama-perplexity"), "-m", gguf, "-f", text_file, "-c", context,
               "--chunks", chunks, "-t", threads, "--kl-divergence-base", kld_base]
    if not write_base:
        command.append("--kl-divergence")
    result = run_tool(command, "llama-perplexity")
    return parse_perplexity(result.stdout + result.stderr)


_NUMBER = r"([-+0-9.eE]+)"
PERPLEXITY_FIGURES = {  # key -> its line; "_pct": llama-perplexity prints a percentage
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUMBER}\s*±\s*{_NUMBER}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUMBER}\s*±\s*{_NUMBER}",
    "kld": rf"Mean\s+KLD:\s*{_NUMBER}\s*±\s*{_NUMBER}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUMBER}",
    "kld_max": rf"Maximum KLD:\s*{_NUMBER}",
    "same_top1_pct": rf"Same top p:\s*{_NUMBER}\s*±\s*{_NUMBER}",
    "rms_dp_pct": rf"RMS Δp\s*:\s*{_NUMBER}\s*±\s*{_NUMBER}",
}


# a row of the table llama-perplexity --kl-divergence prints after each chunk: the chunk's number, then the
# running mean ± SE, over the chunks so far, of PPL(Q), ln(PPL(Q)/PPL(base)), KLD, RMS Δp and same top p
_CHUNK_ROW = re.compile(rf"^\s*(\d+)\s+{_NUMBER}\s*±\s*\S+\s+{_NUMBER}\s*±\s*\S+\s+{_NUMBER}\s*±", re.M)


def chunk_klds(text: str) -> list[float]:
    """Each chunk's own mean KLD, recovered from the running means llama-perplexity prints: chunk k's is
    k·m_k − (k−1)·m_(k−1). The means carry 5 decimals, so chunk k's value is good to about ±1e-5·k."""
    rows = [(int(number), float(kld)) for number, _ppl, _ratio, kld in _CHUNK_ROW.findall(text)]
    if [number for number, _ in rows] != list(range(1, len(rows) + 1)):
        raise ValueError(f"llama-perplexity's chunk table is not chunks 1..{len(rows)} in order")
    sums = [number * mean for number, mean in rows]
    return [total - before for total, before in zip(sums, [0.0] + sums[:-1])]


def parse_perplexity(text: str) -> dict:
    """The figures of PERPLEXITY_FIGURES that a llama-perplexity run printed. Against a base, also
    "kld_per_chunk": each chunk's own KLD (chunk_klds), for an SE across chunks (stats.mean_se) and
    comparisons paired over chunks. llama-perplexity's own SE treats every scored token as independent;
    the tokens of one chunk are not, and which text was read varies from chunk to chunk, so the SE across
    chunks is the one that says how far another text of the same kind may land."""
    parsed: dict = {}
    per_chunk = chunk_klds(text)
    if per_chunk:
        parsed["kld_per_chunk"] = per_chunk
    for key, pattern in PERPLEXITY_FIGURES.items():
        match = re.search(pattern, text)
        if match:
            values = [float(v) for v in match.groups()]
            parsed[key] = {"mean": values[0], "se": values[1] if len(values) > 1 else None}
    if "ppl" not in parsed:  # writing the base prints the classic estimate only
        match = re.search(rf"Final estimate: PPL = {_NUMBER} \+/- {_NUMBER}", text)
        if match:
            parsed["ppl"] = {"mean": float(match.group(1)), "se": float(match.group(2))}
    return parsed


def calibration_file(gguf_dir: Path) -> Path:
    path = gguf_dir / "calibration_wiki.txt"
    if not path.is_file():
        write_text_atomic(path, wiki.calibration_text(assets.wiki_file()))
    return path


def llama_bench(path: Path, device: str, threads: int, split_mode: str = "layer",
                tensor_split: list[float] | None = None, prompts: tuple[int, ...] = (BENCH_PROMPT,),
                gen: int = BENCH_GEN, repetitions: int | None = None) -> dict:
    """{"pp<n>" / "tg<n>": tokens/s, its stddev, repetitions}: llama-bench on `path` (gen 0: prompts only;
    repetitions None: llama-bench's default)."""
    command = [toolchain.tool("llama-bench"), "-m", path, "-p", ",".join(map(str, prompts)), "-n", gen, "-o", "json",
               "-t", threads, "-ngl", 99 if device == "cuda" else 0]
    if repetitions is not None:
        command += ["-r", repetitions]
    if device == "cuda":
        command += ["-sm", split_mode] + (["-ts", "/".join(map(str, tensor_split))] if tensor_split else [])
    rows = json.loads(run_tool(command, "llama-bench").stdout)
    out = {}
    for row in rows:
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[key] = {"tokens_per_s": row["avg_ts"], "stddev": row["stddev_ts"], "repetitions": len(row["samples_ts"])}
    return out
