#!/usr/bin/env bash
# Set up, then the main job on the default model's rotated twin (ewq/twin.py: the same function, its
# matrices on no quantization grid, so that no type is favoured):
#  1. the entropy-threshold plan (the method the project began with), benchmarked through bitsandbytes;
#  2. the original, llama.cpp's Q4_K_M (the F16 file and the importance matrix with it) and Q8_0;
#  3. the kld plan at Q4_K_M's tensor bytes (sensitivities measured on calibration text, over bands of
#     4 layers; the importance matrix Q4_K_M was quantized with), as a GGUF, and through bitsandbytes
#     when that target's floor fits the budget;
#  4. the report (reports/report.md), which opens with the best variant at each preset's size.
# Without a GPU, bitsandbytes' generation stage is skipped (its CPU kernels decode a few tokens a second;
# the report lists the skip). Extra arguments go to every benchmark (e.g. --preset full, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
MODEL=$($PY -c "from ewq import assets; print(assets.twin_model())")
HASH=$($PY -c "import sys; from ewq import weights; print(weights.model_hash(weights.open_model(sys.argv[1])))" "$MODEL")
BNB_SKIP=(--skip generation)
$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" && BNB_SKIP=()

PLAN=$($PY create_quantization_plan.py --model "$MODEL" | sed -n 1p)
$PY benchmark_original.py --model "$MODEL" "$@"
$PY benchmark_ewq.py --model "$MODEL" --plan "$PLAN" "${BNB_SKIP[@]}" "$@"
$PY benchmark_gguf_q4.py --model "$MODEL" "$@"
$PY benchmark_gguf_q8.py --model "$MODEL" "$@"
KLD_PLAN=$($PY create_quantization_plan.py --model "$MODEL" --score kld --sensitivity-band 4 \
           --target-size "quantized_models/$HASH-Q4_K_M-imat.gguf" --imatrix "quantized_models/$HASH-imatrix.gguf" \
           --no-keep-embeddings --no-keep-lm-head | sed -n 1p)
$PY benchmark_gguf_ewq.py --model "$MODEL" --plan "$KLD_PLAN" "$@"
if $PY -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['budget']['bitsandbytes']['meets_budget'] else 1)" \
     "$KLD_PLAN"; then
  $PY benchmark_ewq.py --model "$MODEL" --plan "$KLD_PLAN" "${BNB_SKIP[@]}" "$@"
else
  echo "run_main: the kld plan's bitsandbytes side does not fit Q4_K_M's size (its floor exceeds the budget): not benchmarked" >&2
fi
$PY compare_results.py
