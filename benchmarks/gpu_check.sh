#!/usr/bin/env bash
# The GPU path for real: CUDA, bf16, a randomly initialised Llama of 7B widths (real weights are too big to ship),
# the bundled tokenizer. Stage-2 speed for the three task presets, then mixed-user generation.
#   bash benchmarks/gpu_check.sh TOKENIZER_DIR [RANDOM_MODEL] [OUT_DIR]
# Runs from a checkout without installing perfit (PYTHONPATH=src); needs torch, transformers, safetensors.
set -uo pipefail
tok=${1:?tokenizer folder}
model=${2:-llama-7b}
out=${3:-.}
cd "$(dirname "$0")/.."
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
common=(--random_model "$model" --tokenizer_path "$tok" --num_users 32)
for t in news_headline movie_tagging news_categorize; do
  python3 benchmarks/stage2_speed.py --task_name "$t" "${common[@]}" --history 20 --ref_users 8 --rows_per_pass 256 2>&1 \
    | grep -v -e '|' -e Warning | tee -a "$out/gpu_stage2.txt"
done
for t in movie_tagging news_headline; do
  python3 benchmarks/generate_speed.py --task_name "$t" "${common[@]}" --new_tokens 16 2>&1 \
    | grep -v -e '|' -e Warning | tee -a "$out/gpu_generate.txt"
done
