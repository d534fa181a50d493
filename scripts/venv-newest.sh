#!/usr/bin/env bash
# Creates a virtual environment at DIR with the newest releases that pyproject.toml allows (no lock),
# and this package installed editable with every extra. Used by test-newest.sh and lock.sh.
#   bash scripts/venv-newest.sh DIR
# torch stays on the CPU build of $TORCH (default: the version in requirements.lock), because the
# newest torch on PyPI is a multi-GB CUDA build; set TORCH=2.15.0 (say) to try another one.
set -euo pipefail
cd "$(dirname "$0")/.."
# every extra of pyproject.toml (dev, plot, the trackers)
extras=$(python3 -c 'import tomllib; print(",".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]))')
dir=${1:?usage: venv-newest.sh DIR}
torch=${TORCH:-$(sed -n 's/^torch==//p' requirements.lock)}
python3 -m venv "$dir"
"$dir/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[$extras]" "torch==$torch"
"$dir/bin/python" -m pip check
