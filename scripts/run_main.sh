#!/usr/bin/env bash
# Set up, then the main job on the default model: plan, original benchmark, EWQ benchmark.
# Extra arguments go to both benchmarks (e.g. --quick, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY create_quantization_plan.py
$PY benchmark_original.py "$@"
$PY benchmark_ewq.py "$@"
