#!/usr/bin/env bash
# Set up, then the main job on the default model: the plan, then the original, EWQ (bitsandbytes),
# Q4_K_M, Q8_0 and EWQ GGUF benchmarks. Extra arguments go to every benchmark (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY create_quantization_plan.py
for script in benchmark_original.py benchmark_ewq.py benchmark_gguf_q4.py benchmark_gguf_q8.py benchmark_gguf_ewq.py; do
  $PY "$script" "$@"
done
