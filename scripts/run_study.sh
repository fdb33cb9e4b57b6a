#!/usr/bin/env bash
# After run_main.sh (it needs the original's result and the importance matrix), with the same extra
# arguments as that run (e.g. --quick), which go to every benchmark so that all share its settings:
#  1. llama.cpp's Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M and Q6_K files, built with the one importance matrix
#     and measured for perplexity and KLD (MMLU and generation skipped);
#  2. at each of their tensor sizes, size-budget plans by kld (measured sensitivity; one calibration,
#     cached, serves every size), error (importance-weighted), entropy and random (seed 0; seeds 1, 2
#     at Q4_K_M's size too), each built as a GGUF with the same importance matrix and measured alike;
#  3. the sensitivity study: KLD when only one block / one tensor kind is 4-bit, vs its statistics;
#  4. the report: the equal-size table against Q4_K_M and the size-vs-KLD figure, one line per score.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HASH=$($PY -c "from ewq import assets, weights; print(weights.model_hash(weights.open_model(assets.default_model())))")
IMATRIX=quantized_models/$HASH-imatrix.gguf
[ -f "$IMATRIX" ] || { echo "error: $IMATRIX is missing; run scripts/run_main.sh first" >&2; exit 2; }
SKIP=(--skip mmlu --skip generation)
for preset in Q3_K_M Q4_K_S Q4_K_M Q5_K_M Q6_K; do
  $PY -m ewq.commands.bench_gguf "$preset" "${SKIP[@]}" "$@"
  BUDGET=(--target-size "quantized_models/$HASH-$preset-imat.gguf" --no-keep-embeddings --no-keep-lm-head)
  plans=("$($PY create_quantization_plan.py "${BUDGET[@]}" --score kld --imatrix "$IMATRIX" | sed -n 1p)")
  plans+=("$($PY create_quantization_plan.py "${BUDGET[@]}" --score error --imatrix "$IMATRIX" | sed -n 1p)")
  plans+=("$($PY create_quantization_plan.py "${BUDGET[@]}" --score entropy | sed -n 1p)")
  seeds=(0); [ "$preset" = Q4_K_M ] && seeds=(0 1 2)
  for seed in "${seeds[@]}"; do
    plans+=("$($PY create_quantization_plan.py "${BUDGET[@]}" --score random --seed "$seed" | sed -n 1p)")
  done
  for plan in "${plans[@]}"; do
    $PY benchmark_gguf_ewq.py --plan "$plan" "${SKIP[@]}" "$@"
  done
done
$PY study_sensitivity.py --imatrix "$IMATRIX"
$PY compare_results.py
