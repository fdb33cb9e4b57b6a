"""Host RAM of the bitsandbytes variant's load, printed against issue 11's bound (not asserted in tests).

    python -m benchmarks.bnb_load [--model DIR] [--layers 16]

Default model: a synthetic sharded bf16 Llama (hidden 2048, 16 layers, 49,152-token vocabulary,
benchmarks/synthetic.py) written to a temporary directory. Its entropy plan (the default plan
parameters) is applied with bnb_model.load_quantized() in a fresh process on the CPU;
the process's peak RSS (VmHWM, as every benchmark measures it) is compared with
    quantized size (the read-back weight bytes) + the two largest tensors (float32) + 1.5 GB.
The child's RSS right after importing torch, transformers and bitsandbytes is printed too.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ewq.errors import UserError

GB = 1e9
CHILD = """
import json, sys, torch
from ewq.metrics import memory
import transformers, bitsandbytes
imported = memory.snapshot()["peak_rss_bytes"]
from ewq import bnb_model, weights
from ewq.plan.files import load_plan
plan = load_plan(sys.argv[2])
model, not_applicable = bnb_model.load_quantized(weights.open_model(sys.argv[1]), plan, "cpu", torch.float32)
report = bnb_model.read_back(model, plan, not_applicable)
print(json.dumps({"imported": imported, "peak": memory.snapshot()["peak_rss_bytes"],
                  "weight_bytes": report.weight_bytes, "by_precision": report.details["linear_by_precision"]}))
"""


def measure(model_dir: Path, plans_dir: Path) -> None:
    from ewq import weights
    from ewq.plan import PlanParams
    from ewq.plan.create import create_plan
    from ewq.plan.files import write_plan

    files = weights.open_model(str(model_dir))
    infos = weights.list_tensors(files)
    plan = create_plan(str(model_dir), PlanParams())
    plan_file = write_plan(plan, plans_dir)[0]
    result = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(plan_file)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise UserError(f"the load failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    largest = sorted(info.numel * 4 for info in infos)[-2:]
    bound = figures["weight_bytes"] + sum(largest) + 1.5 * GB
    checkpoint = sum(info.nbytes for info in infos)
    counts = {p: v["modules"] for p, v in figures["by_precision"].items()}
    print(f"model {model_dir}: {checkpoint / GB:.2f} GB of weights in {len(files.weight_files)} file(s); "
          f"plan {plan.plan_hash}: linear modules {counts}")
    print(f"read-back weights {figures['weight_bytes'] / GB:.2f} GB; two largest tensors in float32 "
          f"{sum(largest) / GB:.2f} GB; bound {bound / GB:.2f} GB")
    print(f"peak RSS {figures['peak'] / GB:.2f} GB ({'within' if figures['peak'] <= bound else 'OVER'} the bound; "
          f"{figures['imported'] / GB:.2f} GB of it after the imports alone)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model directory (default: a synthetic bf16 Llama)")
    parser.add_argument("--layers", type=int, default=16, help="layers of the synthetic model")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from benchmarks.synthetic import llama_config, write_checkpoint

            model_dir = write_checkpoint(Path(tmp) / "synthetic", llama_config(args.layers, 2048, 5632))
        measure(model_dir, Path(tmp) / "plans")


if __name__ == "__main__":
    from ewq.commands.common import run_main

    run_main(main)
