#!/usr/bin/env bash
# Runs the test suite in a throw-away venv with the newest releases that pyproject.toml allows
# (scripts/venv-newest.sh: no lock; torch on its CPU build), so that an upstream release that breaks
# us fails here before it reaches a user. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d -t mot-newest-XXXXXX)
trap 'rm -rf "$venv"' EXIT
bash scripts/venv-newest.sh "$venv"
bash scripts/versions.sh "$venv/bin/python" "newest releases"
"$venv/bin/python" -m pytest -n auto "$@"
