#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): `bench/gpu_check.sh` on a GPU machine writes bench/RESULTS-gpu.md (≤ 8 min);
# `bench/gpu_check.sh --smoke [--out DIR]` runs the same steps at toy sizes anywhere (CPU: ≤ 5 min on 2 cores).
# Python: $PYTHON, else the .venv `make install` made, else python3 with e2kd from this checkout — on a lent GPU
# machine (no internet) the image brings torch and timm; e2kd's other dependencies travel as wheels in .whl/, Ray (its
# wheel is over the 64 MiB a call carries) as .whl/ray-*.tar.xz, the wheel unpacked without its jars, rllib, data,
# serve, tune, train and llm (see bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" PYTHONUNBUFFERED=1
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        for tarball in .whl/ray-*.tar.xz; do
            if [[ -e "$tarball" ]]; then tar -xJf "$tarball" -C /tmp/site; fi
        done
        export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$py" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
exec "$py" bench/gpu_check.py "$@"
