#!/usr/bin/env bash
# Runs the test suite in a throw-away venv with every direct requirement of pyproject.toml
# (dependencies and every extra) at the lowest version it declares ("name>=X" -> "name==X";
# what they pull in is the newest that fits). This proves the lower bounds true. Not part of CI: the
# lowest torch comes from PyPI as a CUDA build (about 3 GB). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d -t mot-lowest-XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
mapfile -t lowest < <("$venv/bin/python" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
lowest = {}  # a package named twice (numpy: core and the eval extra) gets the higher of its bounds
for requirement in project["dependencies"] + [r for extra in extras.values() for r in extra]:
    name, lower = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement).groups()
    version = tuple(int(part) for part in re.findall(r"\d+", lower))
    if name not in lowest or version > lowest[name][0]:
        lowest[name] = (version, lower)
for name, (_, lower) in lowest.items():
    print(f"{name}=={lower}")
PY
)
echo "lowest declared: ${lowest[*]}"
"$venv/bin/python" -m pip install -q "${lowest[@]}"
"$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" -m pip check
bash scripts/versions.sh "$venv/bin/python" "lowest declared versions"
"$venv/bin/python" -m pytest -n auto "$@"
