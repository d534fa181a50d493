#!/usr/bin/env bash
# Prints the versions of the packages that matter most, as installed for PYTHON.
#   bash scripts/versions.sh PYTHON [LABEL]
set -euo pipefail
"$1" - "${2:-}" <<'PY'
import sys
from importlib.metadata import version
names = ["torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "numpy", "typer", "rich", "pytest", "matplotlib"]
print(f"{sys.argv[1] or 'installed'}: python {sys.version.split()[0]}, " + ", ".join(f"{n} {version(n)}" for n in names))
PY
