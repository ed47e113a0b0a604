#!/usr/bin/env bash
# Run HERE (PyPI reachable), before a GPU machine is used: the wheels the GPU image lacks, for
# CPython 3.12 on manylinux x86-64, with their dependencies, one version each, into .whl/
# (ignored by git, at most 60 MiB: it travels with the working tree). bench/gpu.sh installs them
# there with --no-index. See bench/gpu_wheels.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" bench/gpu_wheels.py --dest "${WHEELS:-.whl}" "$@"
