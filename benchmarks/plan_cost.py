"""What a plan costs, printed (issue 10's cost targets; figures for the README, not asserted in tests).

    python -m benchmarks.plan_cost weights [--model DIR]   the pass over the weights every plan makes,
        against a minimal read of every tensor (read it, take its max); default model: a synthetic
        ~1.9 GB sharded bf16 Llama written to a temporary directory (benchmarks/synthetic.py)
    python -m benchmarks.plan_cost kld                     a whole `--score kld` plan of the default
        model from an empty cache, then the same plan again (every sensitivity from the cache)

Both print wall-clock seconds on this machine; run them alone, other work on the cores skews them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ewq.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _seconds(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def _drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages (clean pages go without root): the next read is cold."""
    for path in paths:
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def weights_pass(model_dir: Path) -> None:
    from ewq import experts, weights
    from ewq.metrics import memory
    from ewq.plan.create import name_tensors
    from ewq.plan.entropy import tensor_stats

    files = weights.open_model(str(model_dir))
    infos = weights.list_tensors(files)
    size = sum(path.stat().st_size for path in files.weight_files)

    def minimal_read() -> None:
        for _, tensor in weights.iter_tensors(infos):
            tensor.max()

    def plan_pass() -> None:  # what plan.create.read_entries does with every tensor
        for _, tensor in weights.iter_tensors(infos):
            tensor_stats(tensor, 256)

    figures = {}
    for name, work in (("minimal read", minimal_read), ("plan pass", plan_pass)):
        _drop_from_page_cache(files.weight_files)
        figures[name] = [_seconds(work)[0], _seconds(work)[0]]  # cold, then warm
    hashing, _ = _seconds(weights.model_hash, files)
    naming, _ = _seconds(name_tensors, files, infos, experts.stacks([info.name for info in infos]), [])
    read, stats = figures["minimal read"], figures["plan pass"]
    print(f"model {model_dir}: {len(infos)} tensors, {size / 1e9:.2f} GB in {len(files.weight_files)} file(s)")
    print(f"minimal read (each tensor read, its max taken): {read[0]:.2f} s cold, {read[1]:.2f} s warm (page cache)")
    print(f"the plan's pass (entropy and statistics of every tensor): {stats[0]:.2f} s cold = {stats[0] / read[0]:.2f}x, "
          f"{stats[1]:.2f} s warm = {stats[1] / read[1]:.2f}x")
    print(f"once per plan besides: model hash {hashing:.2f} s, GGUF names from llama.cpp's converter (a child "
          f"process importing torch and transformers) {naming:.2f} s")
    print(f"peak RSS {memory.snapshot()['peak_rss_bytes'] / 2**30:.2f} GiB (measured as for every benchmark)")


def kld_plan() -> None:
    from ewq import assets, weights

    model = assets.default_model()
    model_hash = weights.model_hash(weights.open_model(model))
    target = ROOT / "quantized_models" / f"{model_hash}-Q4_K_M-imat.gguf"
    imatrix = ROOT / "quantized_models" / f"{model_hash}-imatrix.gguf"
    command = [sys.executable, str(ROOT / "create_quantization_plan.py"), "--score", "kld",
               "--no-keep-embeddings", "--no-keep-lm-head"]
    command += ["--target-size", str(target)] if target.is_file() else ["--target-bpw", "6.2"]
    command += ["--imatrix", str(imatrix)] if imatrix.is_file() else []
    with tempfile.TemporaryDirectory() as out_dir:
        runs = []
        for _ in range(2):  # from an empty cache, then from the cache
            started = time.perf_counter()
            result = subprocess.run(command + ["--out-dir", out_dir], capture_output=True, text=True)
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines()
                raise UserError(f"the plan failed: {lines[-1] if lines else f'exit {result.returncode}'}")
            runs.append((time.perf_counter() - started, result.stderr))
    measured = re.search(r"sensitivity: (\d+) groups/tensors measured in (\d+) s", runs[0][1])
    print(f"`--score kld` plan of {model} ({' '.join(command[2:])})")
    print(f"from an empty cache: {runs[0][0]:.0f} s" + (
        f" (sensitivity of {measured.group(1)} tensors: {measured.group(2)} s)" if measured else ""))
    print(f"again, every sensitivity from the cache: {runs[1][0]:.0f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    weights_parser = sub.add_parser("weights", help="the pass over the weights against a minimal read")
    weights_parser.add_argument("--model", type=Path, help="a model directory (default: a synthetic 1.9 GB Llama)")
    sub.add_parser("kld", help="a whole --score kld plan of the default model, then again from the cache")
    args = parser.parse_args(argv)
    if args.what == "kld":
        kld_plan()
    elif args.model is not None:
        weights_pass(args.model)
    else:
        from benchmarks.synthetic import llama_config, write_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            weights_pass(write_checkpoint(Path(tmp) / "synthetic", llama_config(14, 2048, 8192)))


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
