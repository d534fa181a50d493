#!/usr/bin/env bash
# Sets up .venv: the CPU build of torch, then this package (editable) with its dev and plot extras.
# Safe to run again: an existing .venv is reused and pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,plot]"
