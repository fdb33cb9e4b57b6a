#!/usr/bin/env bash
# After run_main.sh (it needs the original's result, the Q4_K_M GGUF and the importance matrix):
#  1. size-budget plans at exactly Q4_K_M's tensor bytes, ranked by entropy, by measured 4-bit
#     error (importance-weighted) and at random (3 seeds), each built as a GGUF with the same
#     importance matrix and measured for perplexity and KLD (MMLU and generation skipped);
#  2. the sensitivity study: KLD when only one block / one tensor kind is 4-bit, vs its statistics;
#  3. the report. Extra arguments go to every benchmark (e.g. --quick, if run_main.sh ran with it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HASH=$($PY -c "from ewq import assets, weights; print(weights.model_hash(weights.open_model(assets.default_model())))")
Q4=quantized_models/$HASH-Q4_K_M-imat.gguf
IMATRIX=quantized_models/$HASH-imatrix.gguf
for file in "$Q4" "$IMATRIX"; do
  [ -f "$file" ] || { echo "error: $file is missing; run scripts/run_main.sh first" >&2; exit 2; }
done
BUDGET=(--target-size "$Q4" --no-keep-embeddings --no-keep-lm-head)
plans=("$($PY create_quantization_plan.py "${BUDGET[@]}" --score entropy | sed -n 1p)")
plans+=("$($PY create_quantization_plan.py "${BUDGET[@]}" --score error --imatrix "$IMATRIX" | sed -n 1p)")
for seed in 0 1 2; do
  plans+=("$($PY create_quantization_plan.py "${BUDGET[@]}" --score random --seed "$seed" | sed -n 1p)")
done
for plan in "${plans[@]}"; do
  $PY benchmark_gguf_ewq.py --plan "$plan" --skip mmlu --skip generation "$@"
done
$PY study_sensitivity.py --imatrix "$IMATRIX"
$PY compare_results.py
