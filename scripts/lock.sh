#!/usr/bin/env bash
# Refreshes requirements.lock: builds a throw-away venv with the newest releases that pyproject.toml
# allows (scripts/venv-newest.sh; torch stays at the locked version unless TORCH=X.Y.Z is set), runs
# the test suite in it, and only if it passes writes the exact versions it installed. The lock holds
# names and versions only (no index URLs, no hashes, no local build tags such as +cpu), so it installs
# from any index and with the user's own CPU or CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d -t mot-lock-XXXXXX)
trap 'rm -rf "$venv"' EXIT
bash scripts/venv-newest.sh "$venv"
"$venv/bin/python" -m pytest -n auto
{
    echo "# Exact versions that scripts/setup.sh installs; every one passed the test suite together."
    echo "# Refresh with: bash scripts/lock.sh   (written by it on $(date -u +%Y-%m-%d), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'))"
    # --all keeps setuptools (torch needs it at run time); pip itself is the installer, not a dependency
    "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
