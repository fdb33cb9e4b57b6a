#!/usr/bin/env bash
# After run_main.sh, on its model (the default model's rotated twin; it needs the original's result and
# the importance matrix), with the same extra
# arguments as that run (e.g. --quick), which go to every benchmark so that all share its settings:
#  1. llama.cpp's Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M and Q6_K files, built with the one importance matrix
#     and measured for perplexity and KLD (MMLU and generation skipped), and at each of their tensor
#     sizes the kld plan (measured sensitivity; one calibration, cached, serves every size);
#  2. at the same sizes, plans by error, pr15550 and entropy, through the same menu and optimizer as kld
#     (create_quantization_plan.py's default --allocator optimized) and the same importance matrix;
#  3. random plans (seed 0; seeds 1, 2 at Q4_K_M's size too): the control, likewise;
#  4. the sensitivity study: KLD when only one block / one tensor kind is 4-bit, vs its statistics;
#  5. the report: the equal-size tables and the size-vs-KLD figure, one line per score.
# The most telling comparison comes first, so that a run cut short still has it. A result already
# in benchmark_results/ for these settings is not measured again; an interrupted benchmark resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=$($PY -c "from ewq import assets; print(assets.twin_model())")  # run_main.sh's model
HASH=$($PY -c "import sys; from ewq import weights; print(weights.model_hash(weights.open_model(sys.argv[1])))" "$MODEL")
IMATRIX=quantized_models/$HASH-imatrix.gguf
[ -f "$IMATRIX" ] || { echo "error: $IMATRIX is missing; run scripts/run_main.sh first" >&2; exit 2; }
SKIP=(--skip mmlu --skip generation)
EXTRA=(--model "$MODEL" "$@")
PRESETS=(Q3_K_M Q4_K_S Q4_K_M Q5_K_M Q6_K)
# The settings digest names every result file of this run (benchmark_results/<variant>_<hash>_<digest>.json).
DIGEST=$($PY -m ewq.commands.bench_gguf Q4_K_M "${SKIP[@]}" --dry-run "${EXTRA[@]}" 2>/dev/null \
         | sed -n "s/^.*settings \([0-9a-f]*\):.*$/\1/p")
[ -n "$DIGEST" ] || { echo "error: could not read the settings digest; see --dry-run of bench_gguf" >&2; exit 2; }

measure_plan() {  # measure_plan <preset> <score args...>: plan at the preset's tensor size, then its GGUF
  local preset=$1 plan plan_hash; shift
  plan=$($PY create_quantization_plan.py --model "$MODEL" --target-size "quantized_models/$HASH-$preset-imat.gguf" \
         --no-keep-embeddings --no-keep-lm-head "$@" | sed -n 1p)
  plan_hash=$(basename "$plan" .json | sed 's/^quant_plan_//')
  [ -f "benchmark_results/gguf-ewq-${plan_hash}_${HASH}_${DIGEST}.json" ] ||
    $PY benchmark_gguf_ewq.py --plan "$plan" "${SKIP[@]}" --resume "${EXTRA[@]}"
}

for preset in "${PRESETS[@]}"; do
  lower=$(echo "$preset" | tr 'A-Z' 'a-z')
  [ -f "benchmark_results/gguf-${lower}_${HASH}_${DIGEST}.json" ] ||
    $PY -m ewq.commands.bench_gguf "$preset" "${SKIP[@]}" --resume "${EXTRA[@]}"
  measure_plan "$preset" --score kld --imatrix "$IMATRIX"
done
for preset in "${PRESETS[@]}"; do
  measure_plan "$preset" --score error --imatrix "$IMATRIX"
  measure_plan "$preset" --score pr15550 --imatrix "$IMATRIX"
  measure_plan "$preset" --score entropy --imatrix "$IMATRIX"
done
for preset in "${PRESETS[@]}"; do
  seeds=(0); [ "$preset" = Q4_K_M ] && seeds=(0 1 2)
  for seed in "${seeds[@]}"; do
    measure_plan "$preset" --score random --seed "$seed" --imatrix "$IMATRIX"
  done
done
$PY study_sensitivity.py --model "$MODEL" --imatrix "$IMATRIX"
$PY compare_results.py
