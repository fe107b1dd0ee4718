#!/usr/bin/env bash
# The GPU check, as run on a lent GPU machine (no internet there): the bcos wheel travels in .whl/ (see
# bench/RESULTS.md); torch, timm, einops and safetensors come with the machine's image.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python3 bench/gpu_check.py --batch 64 --steps 20 | tee "${OUT:-/tmp}/gpu_check.json"
