"""What a plan costs, printed (issue 10's and issue 23's cost targets; figures for the README, not asserted in tests).

    python -m benchmarks.plan_cost weights [--model DIR]   the pass over the weights every plan makes,
        against a minimal read of every tensor (read it, take its max); default model: a synthetic
        ~1.9 GB sharded bf16 Llama written to a temporary directory (benchmarks/synthetic.py)
    python -m benchmarks.plan_cost kld                     a whole `--score kld` plan of the default
        model from an empty cache, then the same plan again (every sensitivity from the cache)
    python -m benchmarks.plan_cost scale [--model DIR]     a `--score kld --sensitivity-band 8` plan of a
        synthetic ~1B bf16 Llama (default; SmolLM2's tokenizer) from an empty cache, then one at another
        budget: each stage's seconds and peak resident memory, against the bound "the model in float32 +
        2 GB"; then a cost model for Llama-3.1-8B and -70B from those rates, its assumptions printed

All print wall-clock seconds on this machine; run them alone, other work on the cores skews them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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


# The stages of a kld plan, each ended by the first log line the plan prints after it (ewq.plan.create)
STAGES = (("start: model hash, GGUF names", re.compile(r"^entropy:")),
          ("read: statistics, entropy, every type's error", re.compile(r"^read: ")),
          ("sensitivity of every group", re.compile(r"^sensitivity: \d+ groups/tensors (measured|from)")),
          ("activation rounding (llama.cpp's inputs)", re.compile(r"^activations: ")),
          ("allocation, the whole plan's KLD", re.compile(r"^additivity on")),
          ("files", None))


@dataclass
class Run:
    """One plan run as a child process: per stage its seconds and peak resident memory (bytes): all of it
    (RSS) and the anonymous part (what the process allocated; RSS adds the page cache of the files it has
    memory-mapped, the checkpoint's shards, which the kernel can drop at any time); the log it printed."""
    seconds: dict[str, float]
    peak_rss: dict[str, int]
    peak_anonymous: dict[str, int]
    log: str

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def resident(pid: int) -> tuple[int, int]:
    """(RSS, its anonymous part) of a process in bytes, from /proc/PID/status (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


def monitored(command: list[str]) -> Run:
    """Run `command`, sampling its resident memory every 0.05 s and splitting its time by STAGES."""
    env = {**os.environ, "EWQ_NO_PROGRESS": ""}
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    lines, stage, started = [], 0, time.perf_counter()
    seconds = {name: 0.0 for name, _ in STAGES}
    peak, anonymous = dict.fromkeys(seconds, 0), dict.fromkeys(seconds, 0)
    state = {"stage": 0}

    def sample() -> None:
        while child.poll() is None:
            try:
                rss, anon = resident(child.pid)
            except (OSError, KeyError):
                return
            name = STAGES[state["stage"]][0]
            peak[name], anonymous[name] = max(peak[name], rss), max(anonymous[name], anon)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    buffer = b""
    for chunk in iter(lambda: child.stderr.read1(4096), b""):
        buffer += chunk
        *complete, buffer = re.split(rb"[\r\n]", buffer)
        for raw in complete:
            line = raw.decode(errors="replace")
            if line.strip() and not line.startswith(("entropy:", "sensitivity: ", "Loading")) or "groups/tensors" in line:
                lines.append(line)
            while stage < len(STAGES) - 1 and STAGES[stage][1].search(line):
                now = time.perf_counter()
                seconds[STAGES[stage][0]], started = now - started, now
                stage += 1
                state["stage"] = stage
    child.wait()
    sampler.join()
    seconds[STAGES[stage][0]] = time.perf_counter() - started
    if child.returncode != 0:
        raise UserError(f"the plan failed: {lines[-1] if lines else f'exit {child.returncode}'}")
    return Run(seconds, peak, anonymous, "\n".join(lines))


GIB = 2 ** 30


def scale(model_dir: Path | None) -> None:
    from benchmarks.synthetic import llama_config, tensor_shapes, write_checkpoint
    from ewq import assets

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            config = llama_config(14, 2048, 8192)
            model_dir = write_checkpoint(Path(tmp) / "synthetic", config)
            assets.copy_default_tokenizer(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        weights = sum(math.prod(shape) for shape in tensor_shapes(config).values())
        base = [sys.executable, str(ROOT / "create_quantization_plan.py"), "--model", str(model_dir), "--score", "kld",
                "--sensitivity-band", "8", "--no-keep-embeddings", "--no-keep-lm-head", "--out-dir", str(Path(tmp) / "plans")]
        runs = {bpw: monitored(base + ["--target-bpw", bpw]) for bpw in ("4.5", "5.5")}
    bound = weights * 4 + 2 * 10 ** 9
    print(f"model {model_dir}: {weights / 1e9:.3f} B weights, bf16 on disk, measured in float32 on the CPU "
          f"({os.cpu_count()} cores); bound: the model in float32 + 2 GB = {bound / GIB:.2f} GiB")
    print(f"{'stage':46s} {'first plan (4.5 bpw): s, RSS, anon. GiB':>40s} {'second (5.5 bpw)':>30s}")
    first, second = runs["4.5"], runs["5.5"]
    for name, _ in STAGES:
        print(f"{name:46s} " + "   ".join(f"{run.seconds[name]:8.0f} s {run.peak_rss[name] / GIB:6.2f} "
                                          f"{run.peak_anonymous[name] / GIB:6.2f}" for run in (first, second)))
    for label, run in (("first", first), ("second", second)):
        rss, anon = max(run.peak_rss.values()), max(run.peak_anonymous.values())
        print(f"{label} plan: {run.total:.0f} s; peak anonymous memory {anon / GIB:.2f} GiB "
              f"({'within' if anon <= bound else 'ABOVE'} the bound), peak RSS with the checkpoint's mapped pages "
              f"{rss / GIB:.2f} GiB ({'within' if rss <= bound else 'above'} it)")
    print(f"the second plan took {second.total / first.total:.1%} of the first's time")
    print(first.log)
    print(cost_model(first, weights))


def distortion_weights(config: dict) -> int:
    """Weights the distortion table quantizes for a model of `config` (every matrix planned, the larger
    ones on their row sample: ewq.plan.distortion)."""
    from benchmarks.synthetic import tensor_shapes
    from ewq.plan.distortion import SAMPLE_ABOVE, SAMPLE_WEIGHTS

    total = 0
    for shape in tensor_shapes(config).values():
        if len(shape) == 2:
            numel = math.prod(shape)
            total += numel if numel <= SAMPLE_ABOVE else min(numel, -(-SAMPLE_WEIGHTS // shape[1]) * shape[1])
    return total


# The architectures of the cost model: Llama-3.1-8B and -70B (hidden, layers, intermediate, KV heads, vocabulary)
TARGETS = {"Llama-3.1-8B": dict(hidden=4096, layers=32, intermediate=14336, kv_heads=8, vocab=128256),
           "Llama-3.1-70B": dict(hidden=8192, layers=80, intermediate=28672, kv_heads=8, vocab=128256)}
ASSUMED = dict(host_cores=32, disk_gb_s=2.0, gpu_tflops=400.0, gpu_efficiency=0.3)


def cost_model(first: "Run", weights_1b: int) -> str:
    """8B and 70B kld plans (band 8) from the first plan's rates, on one GPU and on several (module doc)."""
    from benchmarks.synthetic import llama_config, tensor_shapes
    from ewq.llamacpp.quantizers import round_trip
    from ewq.quant_types import LlamaType

    import numpy as np

    matrix = np.random.default_rng(0).standard_normal((4096, 2048)).astype(np.float32)
    started = time.perf_counter()
    round_trip(matrix, LlamaType.Q4_K)
    round_trip_rate = (time.perf_counter() - started) / matrix.size  # s per weight, one thread
    config_1b = json.loads(json.dumps(llama_config(14, 2048, 8192)))
    read_rate = first.seconds[STAGES[1][0]] / distortion_weights(config_1b)  # s per weight measured, all cores
    cores = os.cpu_count() or 1
    lines = [f"cost model, band 8, Llama shapes; measured here: the read pass {read_rate * 1e9:.1f} s per 1e9 weights "
             f"of the distortion table on {cores} cores (12 llama.cpp types + 3 bitsandbytes; sampling as planned), "
             f"a Q4_K round trip {round_trip_rate * 1e9:.1f} s per 1e9 weights on one thread; assumed: "
             f"{ASSUMED['host_cores']} host cores, disk {ASSUMED['disk_gb_s']:.0f} GB/s, a GPU of "
             f"{ASSUMED['gpu_tflops']:.0f} bf16 TFLOP/s at {ASSUMED['gpu_efficiency']:.0%} (H100 class), 2 x 512 "
             "calibration tokens, the model in bf16 on the GPU(s), round trips on every host core"]
    for name, shape in TARGETS.items():
        config = llama_config(shape["layers"], shape["hidden"], shape["intermediate"], shape["vocab"])
        config["num_key_value_heads"] = shape["kv_heads"]
        n = sum(math.prod(s) for s in tensor_shapes(config).values())
        read = read_rate * distortion_weights(config) * cores / ASSUMED["host_cores"]
        groups = 7 * -(-shape["layers"] // 8) + 2
        # every planned weight is round-tripped once at its reference type and once in the whole plan
        host = 2 * n * round_trip_rate / ASSUMED["host_cores"]
        # a group runs the layers from its first block on (half the model on average), 1024 tokens, 2 FLOP/weight
        forward = groups * 0.5 * 2 * n * 1024 / (ASSUMED["gpu_tflops"] * 1e12 * ASSUMED["gpu_efficiency"])
        load = 2 * n / (ASSUMED["disk_gb_s"] * 1e9)
        gpus = max(1, math.ceil(2 * n * 1.15 / (80 * GIB)))
        lines.append(f"{name} ({n / 1e9:.1f} B weights, {groups} groups): read pass {read / 60:.0f} min; measurement "
                     f"{(host + forward + load) / 60:.0f} min (round trips on the host {host / 60:.0f}, forward passes "
                     f"{forward / 60:.1f}, loading {load / 60:.1f}); {gpus} x 80 GB GPU(s) "
                     f"({'--device-map auto' if gpus > 1 else 'one'}: bf16 weights {2 * n / GIB:.0f} GiB + 15%); "
                     f"a plan at another budget: the read pass's statistics and the whole plan's KLD only")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    weights_parser = sub.add_parser("weights", help="the pass over the weights against a minimal read")
    weights_parser.add_argument("--model", type=Path, help="a model directory (default: a synthetic 1.9 GB Llama)")
    sub.add_parser("kld", help="a whole --score kld plan of the default model, then again from the cache")
    scale_parser = sub.add_parser("scale", help="a kld plan of a synthetic ~1B Llama: each stage's time and peak "
                                                "RAM, a second budget, and the 8B / 70B cost model")
    scale_parser.add_argument("--model", type=Path, help="a Llama checkpoint with a tokenizer (default: synthetic ~1B)")
    args = parser.parse_args(argv)
    if args.what == "kld":
        kld_plan()
    elif args.what == "scale":
        scale(args.model)
    elif args.model is not None:
        weights_pass(args.model)
    else:
        from benchmarks.synthetic import llama_config, write_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            weights_pass(write_checkpoint(Path(tmp) / "synthetic", llama_config(14, 2048, 8192)))


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
