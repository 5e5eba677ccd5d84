#!/usr/bin/env bash
# One command after `git clone`: install gptlab into .venv (CPU PyTorch unless there is an NVIDIA GPU),
# train the quick-start model on the built-in corpus (Python's own documentation: nothing to download),
# then sample from it. Extra arguments go to `gptlab train` (e.g. --max-steps 50).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh "hf,plot"
# shellcheck disable=SC1091
. "${GPTLAB_VENV:-.venv}/bin/activate"
gptlab train --config quickstart "$@"
gptlab sample --init runs/quickstart --prompt "The " --max-new-tokens 100
gptlab plot runs/quickstart --out runs/quickstart/loss.png
echo "quickstart: done. Activate the environment with: . ${GPTLAB_VENV:-.venv}/bin/activate" >&2
