#!/usr/bin/env bash
# Set up, then run the test suite (unit tests and an end-to-end --quick run of the scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export EWQ_NO_PROGRESS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
