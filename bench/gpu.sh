#!/usr/bin/env bash
# The GPU figures of issue 4 in one run, about 8 minutes on one H100 / H200 (+ the training
# benchmark of issue 12, about 3 more):
# full-size random-weight SD1.5 (bench/fullsize.py: the real architecture, so the real cost),
# 512x512, 30 steps, fp16 (ipbatch's CUDA default), 32 rows with 30% repeated references:
#   - the plain diffusers loop (one row per call, reference re-encoded every row),
#   - a bare batched diffusers call at B = 1, 4, 8 (the ceiling: no ledger, no files),
#   - ipbatch at B = 1, 4, 8, eager and with IPBATCH_COMPILE (compile time not counted),
#   - the GPU's busy fraction during each run (nvidia-smi every 200 ms).
# DRY_RUN=1 runs the same path on tiny models on the CPU (about 4 minutes, mostly the
# CPU compile), to check the script before a GPU machine is spent on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${DRY_RUN:-0}" = 1 ]; then
    args=(--models tiny --rows 8 --steps 2 --batch-images 1,4 --bare --compile)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    args=(--models fullsize --rows 32 --steps 30 --size 512 --batch-images 1,4,8 --bare --compile)
fi
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
time "$PY" bench/generate.py "${args[@]}"
# training (issue 12): steps/s of `ipbatch train`'s loop, fp32 / fp16 / bf16, +- checkpointing
if [ "${DRY_RUN:-0}" = 1 ]; then
    time "$PY" bench/train.py --models tiny --steps 3
else
    time "$PY" bench/train.py --models fullsize --batch-size 8 --steps 10
fi
