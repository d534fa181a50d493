#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job: `mot-transition run` on the tiny recipe
# (train MoT, convert, transition-tune, train the Token Choice baseline, compare). Extra arguments
# go to `mot-transition run`, e.g. `bash scripts/run.sh tiny --out runs/mine train.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mot-transition run "$@"
