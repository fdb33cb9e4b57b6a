#!/usr/bin/env bash
# Set up a fresh checkout: .venv with pinned packages, the offline default model and data (ewq/assets.py),
# and llama.cpp built from source.
# Idempotent: a second run checks a stamp and the prepared files and does nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned packages" >&2
  # torch first and alone: a later resolver step then finds it satisfied and pulls no CUDA wheels.
  "$VENV/bin/pip" install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$STAMP"
fi
"$VENV/bin/python" -m ewq.commands.setup assets

# llama.cpp from the source vendored by llama-cpp-python: the tools with cmake, the Python
# bindings with pip (compiled from the same source package, never a prebuilt binary).
# EWQ_CUDA=1 builds both with CUDA.
cuda_flag=""; cmake_args="-DLLAVA_BUILD=OFF"
if [ "${EWQ_CUDA:-0}" = 1 ]; then cuda_flag="--cuda"; cmake_args="$cmake_args -DGGML_CUDA=on"; fi
"$VENV/bin/python" -m ewq.commands.setup llamacpp $cuda_flag
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building the llama_cpp Python bindings from source (several minutes)" >&2
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-binary llama-cpp-python "$(grep -E '^llama-cpp-python==' requirements-llamacpp.txt)"
fi
