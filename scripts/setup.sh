#!/usr/bin/env bash
# Sets up .venv with the exact versions of requirements.lock (torch included: on this machine pip takes
# its CPU build from local disk; elsewhere pip takes the index's build, or keep your own by installing
# it at the locked version first), then this package, editable, without touching the locked set.
# Safe to run again: an existing .venv is reused and moved to the locked versions.
# Refresh the lock with `bash scripts/lock.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -m pip check
