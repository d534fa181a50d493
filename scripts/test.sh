#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh: the locked versions) and runs the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/versions.sh .venv/bin/python "locked set (requirements.lock)"
.venv/bin/python -m pytest -n auto "$@"
