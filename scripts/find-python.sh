#!/usr/bin/env bash
# Print the path of a CPython X.Y interpreter (`scripts/find-python.sh 3.12`): `pythonX.Y` on
# PATH if it runs (a pyenv shim for a version that is not selected does not), else one that
# pyenv installed, else the system's /usr/bin/pythonX.Y. Exit 1 with a message when none is.
set -euo pipefail
version=${1:?usage: find-python.sh X.Y}
candidates=("python$version")
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for dir in "$root"/versions/"$version".*/bin; do candidates+=("$dir/python$version"); done
candidates+=("/usr/bin/python$version" "/usr/local/bin/python$version")
for candidate in "${candidates[@]}"; do
  if "$candidate" -c "import sys, venv; assert sys.version_info[:2] == tuple(map(int, '$version'.split('.')))" 2>/dev/null; then
    command -v "$candidate"
    exit 0
  fi
done
echo "find-python.sh: no Python $version here (tried ${candidates[*]}); install it (pyenv install $version, or your distribution's python$version package)" >&2
exit 1
