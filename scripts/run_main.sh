#!/usr/bin/env bash
# Set up, then the main job on the default model: the plan, then the original, EWQ (bitsandbytes),
# Q4_K_M, Q8_0 and EWQ GGUF benchmarks, then the report (reports/report.md).
# Extra arguments go to every benchmark (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
PLAN=$($PY create_quantization_plan.py | sed -n 1p)
$PY benchmark_original.py "$@"
$PY benchmark_ewq.py --plan "$PLAN" "$@"
$PY benchmark_gguf_q4.py "$@"
$PY benchmark_gguf_q8.py "$@"
$PY benchmark_gguf_ewq.py --plan "$PLAN" "$@"
$PY compare_results.py
