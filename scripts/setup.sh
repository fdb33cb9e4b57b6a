#!/usr/bin/env bash
# Set up a fresh checkout: .venv with pinned packages, the offline default model and data (ewq/assets.py),
# and llama.cpp built once from the source llama-cpp-python vendors: its tools and the library that its
# Python bindings load (ewq/llamacpp/toolchain.py).
# Quiet: a line per step with its time; each step's output in .cache/logs/<step>.log, and on a failure
# that log's path and its last lines. Idempotent: when everything is in place it prints one line.
# EWQ_CUDA=1 builds llama.cpp with CUDA for the present GPU, EWQ_CUDA=0 without; by default, with CUDA
# when nvcc and a GPU (nvidia-smi -L) are both found. A change of mode rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256
LOGS=.cache/logs
want=$(cat requirements.txt requirements-llamacpp.txt | sha256sum | cut -d' ' -f1)
cuda=${EWQ_CUDA:-auto}
if [ "$cuda" = auto ]; then
  cuda=0
  if command -v nvcc >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=1; fi
fi
cuda_flag=""; [ "$cuda" = 1 ] && cuda_flag="--cuda"

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] \
   && "$VENV/bin/python" -m ewq.commands.setup check $cuda_flag 2>/dev/null; then
  echo "setup: ready ($VENV, .cache; llama.cpp $([ "$cuda" = 1 ] && echo CUDA || echo CPU))"
  exit 0
fi

mkdir -p "$LOGS"
step() {  # step NAME COMMAND...: run it with its output in $LOGS/NAME.log; one line, or the log's tail
  local name=$1 start=$SECONDS; shift
  printf 'setup: %-44s' "$name ..." >&2
  if "$@" > "$LOGS/$name.log" 2>&1; then
    echo " done ($((SECONDS - start)) s)" >&2
  else
    echo " FAILED after $((SECONDS - start)) s; log: $LOGS/$name.log, last lines:" >&2
    tail -n 15 "$LOGS/$name.log" | sed 's/^/  | /' >&2
    exit 1
  fi
}
install_packages() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # torch first and alone: a later resolver step then finds it satisfied and pulls no CUDA wheels.
  "$VENV/bin/pip" install --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)"
  "$VENV/bin/pip" install --disable-pip-version-check -r requirements.txt
  echo "$want" > "$STAMP"
}
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || [ ! -x "$VENV/bin/python" ]; then
  step packages install_packages
fi
step assets "$VENV/bin/python" -m ewq.commands.setup assets
step "llama.cpp-$([ "$cuda" = 1 ] && echo cuda || echo cpu)" "$VENV/bin/python" -m ewq.commands.setup llamacpp $cuda_flag
step bindings "$VENV/bin/python" -m ewq.commands.setup bindings
echo "setup: ready" >&2
