#!/usr/bin/env bash
# A virtualenv (GPTLAB_VENV, default .venv) with PyTorch and gptlab installed in it, editable, with the
# extras given as $1 (e.g. "hf,plot" or "dev"). Used by quickstart.sh and test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GPTLAB_VENV:-.venv}"
EXTRAS="${1:-hf,plot}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || { echo "install.sh: python3 -m venv failed; install Python >= 3.10 with venv" \
                                    "(Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install.sh: NVIDIA GPU found: installing PyTorch's default (CUDA) build" >&2
    python -m pip install --quiet torch
  else
    # No GPU: the CPU build, never the multi-GB CUDA wheel. A machine with its own wheel mirror (pip's
    # find-links) may hold a CPU wheel; otherwise PyTorch's CPU wheel index has one.
    echo "install.sh: no NVIDIA GPU: installing the CPU build of PyTorch" >&2
    version() { python -c "import importlib.metadata as m; print(m.version('torch'))"; }
    if python -m pip install --quiet --no-index --no-deps torch 2>/dev/null && [[ "$(version)" == *+cpu ]]; then
      python -m pip install --quiet "torch==$(version)"  # that wheel's dependencies, from the package index
    else
      python -m pip uninstall --quiet --yes torch 2>/dev/null || true
      python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
python -m pip install --quiet -e ".[$EXTRAS]"
python -c "import torch, gptlab; print('install.sh: torch', torch.__version__, '| gptlab', gptlab.__version__, \
'| CUDA' if torch.cuda.is_available() else '| CPU')"
