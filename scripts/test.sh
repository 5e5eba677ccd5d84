#!/usr/bin/env bash
# One command after `git clone`: install gptlab with everything its tests need into .venv, then run the
# whole test suite. Extra arguments go to pytest (e.g. -m "not slow", -x, tests/test_model.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh "dev"
# shellcheck disable=SC1091
. "${GPTLAB_VENV:-.venv}/bin/activate"
exec python -m pytest -q "$@"
