#!/usr/bin/env bash
# The GPU benchmark in one prepared command, for a GPU host with no network (the lent GPU
# machine: Python 3.12 with CUDA torch preinstalled, no diffusers, Celery, SQLAlchemy, boto3,
# pydantic or insightface):
#   here, once:  bench/gpu-wheels.sh     # .whl/: what that image lacks, cp312 wheels, < 60 MiB
#   there:       bench/gpu.sh OUT        # with .whl/ carried along; OUT defaults to $OUT
# It installs .whl/*.whl with --no-index into a target folder (the image's torch is kept),
# writes full-size random-weight SD1.5 (bench/fullsize.py: the real architecture, so the real
# cost), runs bench/gpu_run.py within BUDGET seconds (default 450: with the install, under 8
# minutes) and leaves OUT/figures.json and OUT/figures.txt, partial if the budget ran out:
# the plain diffusers loop, a bare batched call and ipbatch eager and compiled at B = 1, 4, 8
# (512x512, 30 steps, fp16) with the GPU's busy fraction and the UNet FLOP/s as a fraction of
# the measured bf16 peak; then the training loop's steps/s (fp32, fp16, bf16).
# DRY_RUN=1: the same on tiny models on the CPU; `make gpu-rehearsal` runs it in a clean
# Python 3.12 environment holding only the GPU image's packages, before a GPU is ever used.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench-out}}
PY=${PY:-python3}
site=${SITE:-/tmp/ipbatch-site}
"$PY" -c "import sys; print('python', sys.version.split()[0], sys.executable)"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/ here: using the packages $PY already has (run bench/gpu-wheels.sh first)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
args=(--out "$out" --budget "${BUDGET:-450}")
if [ "${DRY_RUN:-0}" = 1 ]; then
    args+=(--dry-run)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/gpu_run.py "${args[@]}"
